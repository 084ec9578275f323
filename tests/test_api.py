"""The RFDETR API against the reference rfdetr==1.11.2 `predict`, and the demo from the README."""
import subprocess, sys
import numpy as np
import pytest
import torch
from PIL import Image
from oracle import reference_model, save_official
import rfdetr_nb

@pytest.fixture(scope='module')
def nano_pair(tmp_path_factory):
    "Reference and rfdetr_nb Nano detectors loaded from one random-weight official-format checkpoint."
    import rfdetr
    ref, ns = reference_model('nano')
    path = str(save_official(ref, ns, tmp_path_factory.mktemp('w') / 'nano.pth'))
    return rfdetr.RFDETRNano(pretrain_weights=path, device='cpu'), rfdetr_nb.RFDETRNano(pretrain_weights=path, device='cpu')

def images():
    rng = np.random.default_rng(0)
    return [(rng.random((240, 320, 3)) * 255).astype(np.uint8), (rng.random((300, 200, 3)) * 255).astype(np.uint8)]

def assert_same(a, b):
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.xyxy, b.xyxy, atol=1e-3)
    np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)
    np.testing.assert_array_equal(a.class_id, b.class_id)

@pytest.mark.parametrize('kind', ['single', 'pil', 'batch', 'shape'])
def test_predict_matches_reference(nano_pair, kind):
    ref, ours = nano_pair
    ims = images()
    if kind == 'single': assert_same(ref.predict(ims[0], threshold=0.05), ours.predict(ims[0], threshold=0.05))
    if kind == 'pil':
        im = Image.fromarray(ims[1])
        assert_same(ref.predict(im, threshold=0.05), ours.predict(im, threshold=0.05))
    if kind == 'batch':
        for a, b in zip(ref.predict(ims, threshold=0.05), ours.predict(ims, threshold=0.05)): assert_same(a, b)
    if kind == 'shape':
        assert_same(ref.predict(ims[0], threshold=0.05, shape=(320, 448)), ours.predict(ims[0], threshold=0.05, shape=(320, 448)))

def test_class_names_match_reference(nano_pair):
    ref, ours = nano_pair
    assert list(ref.class_names) == ours.class_names

def test_api_surface(nano_pair):
    _, rf = nano_pair
    m = rf.model
    assert isinstance(m.model, torch.nn.Module) and m.resolution == 384 and m.device == torch.device('cpu')
    assert m.args.num_queries == 300 and callable(m.postprocess)
    out = m.model(torch.zeros(1, 3, 384, 384))
    assert set(out) == {'pred_logits', 'pred_boxes', 'aux_outputs', 'enc_outputs'}

def test_offline_default_weights_error(tmp_path, monkeypatch):
    "Without a network the default (official) weights fail fast, naming the URL and where to put the file."
    monkeypatch.setenv('RF_HOME', str(tmp_path))
    with pytest.raises(ConnectionError, match=str(tmp_path / 'rf-detr-nano.pth')):
        rfdetr_nb.RFDETRNano(device='cpu')

def test_demo_runs(tmp_path):
    out = tmp_path / 'pred.jpg'
    r = subprocess.run([sys.executable, '-m', 'rfdetr_nb.demo', '--out', str(out)], capture_output=True, text=True,
                       env={'RF_HOME': str(tmp_path), 'PATH': '/usr/bin:/bin', 'HF_HUB_OFFLINE': '1'}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'detections' in r.stdout and Image.open(out).size == (640, 480)
