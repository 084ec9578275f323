"""Keep executed notebooks light: drop saved widget state (the notebooks show static snapshots instead), and where an
output offers a picture as both PNG and JPEG (PIL does), keep the smaller. Stamp every executed code cell with the MD5
of its source (`source_md5`), so that .ci/check_outputs.py can tell when a cell changed after its outputs were stored."""
import hashlib, json, sys

def source_md5(cell) -> str: return hashlib.md5(''.join(cell['source']).encode()).hexdigest()

for path in sys.argv[1:]:
    nb = json.load(open(path))
    nb['metadata'].pop('widgets', None)
    for cell in nb['cells']:
        if cell['cell_type'] == 'code': cell['metadata']['source_md5'] = source_md5(cell)
        for out in cell.get('outputs', []):
            data = out.get('data', {})
            if 'image/png' in data and 'image/jpeg' in data:
                del data['image/png' if len(data['image/png']) > len(data['image/jpeg']) else 'image/jpeg']
    with open(path, 'w') as f: json.dump(nb, f, indent=1, ensure_ascii=False); f.write('\n')
