"""The README's first command: `rfdetr-nb-demo --quick` trains, scores and draws in a fresh process."""
import subprocess, sys
import pandas as pd
from PIL import Image

def test_demo_quick_learns(tmp_path):
    "The tiny plan: the training loss falls, the mAP rises, checkpoints, history and the annotated image are written."
    out, image = tmp_path / 'demo_output', tmp_path / 'pred.jpg'
    r = subprocess.run([sys.executable, '-m', 'rfdetr_nb.demo', '--quick', '--output-dir', str(out), '--out', str(image),
                        '--threads', '1'], capture_output=True, text=True, timeout=600,
                       env={'RF_HOME': str(tmp_path), 'PATH': '/usr/bin:/bin', 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Validation split: mAP' in r.stdout and 'Annotated image saved' in r.stdout, r.stdout[-2000:]
    history = pd.read_csv(out / 'history.csv')
    assert history['train_loss'].iloc[-1] < 0.85 * history['train_loss'].iloc[0], history
    assert history['mAP50'].iloc[-5:].max() > history['mAP50'].iloc[:3].max() + 0.05, history
    assert {'checkpoint_best_total.pth', 'last.pth'} <= {p.name for p in out.iterdir()}
    assert Image.open(image).size == (64, 64)
