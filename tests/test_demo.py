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


def test_seg_demo_quick_learns(tmp_path):
    "`--task segment`: the tiny plan with the mask head learns masks (mask mAP50 rises), prints mask mAP, draws the masks."
    out, image = tmp_path / 'demo_output', tmp_path / 'pred.jpg'
    r = subprocess.run([sys.executable, '-m', 'rfdetr_nb.demo', '--quick', '--task', 'segment', '--output-dir', str(out),
                        '--out', str(image), '--threads', '1'], capture_output=True, text=True, timeout=600,
                       env={'RF_HOME': str(tmp_path), 'PATH': '/usr/bin:/bin', 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'mask mAP50' in r.stdout and 'Annotated image saved' in r.stdout, r.stdout[-2000:]
    history = pd.read_csv(out / 'history.csv')
    assert history['train_loss'].iloc[-1] < 0.85 * history['train_loss'].iloc[0], history
    assert history['mask_mAP50'].iloc[-5:].max() > history['mask_mAP50'].iloc[:3].max() + 0.05, history
    assert (out / 'shapes_16_0_64_masks').is_dir() and Image.open(image).size == (64, 64)


def test_demo_unknown_task(tmp_path):
    "An unknown --task is refused with the tasks there are."
    r = subprocess.run([sys.executable, '-m', 'rfdetr_nb.demo', '--quick', '--task', 'classify', '--output-dir', str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={'RF_HOME': str(tmp_path), 'PATH': '/usr/bin:/bin'})
    assert r.returncode != 0 and "'detect', 'segment'" in r.stderr, r.stderr[-2000:]
