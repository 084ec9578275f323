"""Stored notebook outputs are not stale: every code cell with outputs was executed with its current source (the
`source_md5` stamp .ci/refresh-outputs writes), and no stored output is an error. Exit 1 listing the cells to refresh."""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from slim_outputs import source_md5

problems = []
for path in sorted(Path('nbs').glob('*.ipynb')):
    for i, cell in enumerate(json.loads(path.read_text())['cells']):
        if cell['cell_type'] != 'code' or not cell.get('outputs'): continue
        where = f"{path} cell {i} ({''.join(cell['source']).splitlines()[0][:60]!r})"
        if cell['metadata'].get('source_md5') != source_md5(cell): problems.append(f"{where}: changed since its outputs were stored")
        if any(o['output_type'] == 'error' for o in cell['outputs']): problems.append(f"{where}: stores an error")
if problems:
    print('\n'.join(problems))
    print(f"FAIL: {len(problems)} stale or failed outputs: run `bash .ci/refresh-outputs NOTEBOOK` and commit.", file=sys.stderr)
    sys.exit(1)
print('stored outputs are current')
