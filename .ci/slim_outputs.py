"""Keep executed notebooks light: drop saved widget state (the notebooks show static snapshots instead), and where an
output offers a picture as both PNG and JPEG (PIL does), keep the smaller."""
import json, sys

for path in sys.argv[1:]:
    nb = json.load(open(path))
    nb['metadata'].pop('widgets', None)
    for cell in nb['cells']:
        for out in cell.get('outputs', []):
            data = out.get('data', {})
            if 'image/png' in data and 'image/jpeg' in data:
                del data['image/png' if len(data['image/png']) > len(data['image/jpeg']) else 'image/jpeg']
    with open(path, 'w') as f: json.dump(nb, f, indent=1, ensure_ascii=False); f.write('\n')
