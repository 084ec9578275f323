"""Write README.md from nbs/index.ipynb (what `nbdev-readme` does with Quarto, which these machines cannot install)."""
import json, re
from pathlib import Path

root = Path(__file__).resolve().parent.parent
cells = json.loads((root / 'nbs' / 'index.ipynb').read_text())['cells']
parts = []
for c in cells:
    src = ''.join(c['source'])
    if c['cell_type'] == 'markdown': parts.append(src)
    else:
        lines = [l for l in src.splitlines() if not l.startswith('#|')]
        if lines: parts.append('```python\n' + '\n'.join(lines) + '\n```')
readme = '\n\n'.join(parts) + '\n'
readme = readme.replace('\n> ', '\n', 1) if readme.startswith('# ') else readme
readme = re.sub(r'\]\((\w+\.ipynb)\)', r'](nbs/\1)', readme)     # links between notebooks, from the repository root
# the site's pages (`config.html`, named after the module) → their notebooks: `[00_config](config.html)` by its text,
# other links (`[What we measured](demo.html#what-we-measured)`) by the notebook whose page it is
readme = re.sub(r'\[(\d+\w*?_(\w+))\]\(\2\.html\)', r'[\1](nbs/\1.ipynb)', readme)
pages = {re.sub(r'^\d+[a-zA-Z0-9]*_', '', p.stem.lower()) + '.html': p.name for p in sorted((root / 'nbs').glob('*.ipynb'))}
readme = re.sub(r'\]\((\w+\.html)(#[\w-]*)?\)', lambda m: f'](nbs/{pages[m[1]]})' if m[1] in pages else m[0], readme)
(root / 'README.md').write_text('<!-- Generated from nbs/index.ipynb by .ci/readme.py (or nbdev-readme); do not edit. -->\n\n' + readme)
