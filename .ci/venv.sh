# Sourced by .ci/run and .ci/demo: make .venv with Python 3.12 and install the project into it ($1: pip extras).
find_python312() {
  local c
  for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then echo "$c"; return 0; fi
  done
  return 1
}
PY=$(find_python312) || { echo "Python 3.12 is required (onnx2tf needs it); install python3.12 and retry." >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$1"
source .venv/bin/activate
export HF_HUB_OFFLINE=1
