"""The RFDETR API against the reference rfdetr==1.11.2 `predict`, and the demo from the README."""
import numpy as np
import pytest
import torch
from PIL import Image
from oracle import reference_model, save_official
import rfdetr_nb
from rfdetr_nb.backbone import fast_kernels


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

def assert_same(a, b, exact=True):
    "The same detections; bit-identical on the exact path, within float rounding on the fast one."
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.class_id, b.class_id)
    if exact:
        np.testing.assert_array_equal(a.xyxy, b.xyxy)
        np.testing.assert_array_equal(a.confidence, b.confidence)
    else:
        np.testing.assert_allclose(a.xyxy, b.xyxy, atol=1e-3)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)

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

@pytest.mark.parametrize('compile', [False, True])
def test_optimized_predict_matches_reference(nano_pair, compile):
    ref, ours = nano_pair
    im = images()[0]
    ours.optimize_for_inference(compile=compile, dtype='float32')
    try: assert_same(ref.predict(im, threshold=0.05), ours.predict(im, threshold=0.05))
    finally: ours.remove_optimized_model()

def test_traced_fast_kernels_match_reference(nano_pair):
    "Traced with the default (oneDNN) kernels on, the optimised model keeps them and still matches the reference."
    ref, ours = nano_pair
    im = images()[0]
    with fast_kernels(True):
        ours.optimize_for_inference(compile=True)
        try:
            assert 'rfdetr_nb::onednn_linear' in str(ours.model.inference_model.inlined_graph)
            assert_same(ref.predict(im, threshold=0.05), ours.predict(im, threshold=0.05), exact=False)
        finally: ours.remove_optimized_model()

def test_from_checkpoint_keeps_class_names(tmp_path, nano_pair):
    "Fine-tuned heads are 0-based and their names travel in the checkpoint; COCO heads use sparse ids."
    _, rf = nano_pair
    names = ['cat', 'dog', 'fish']
    ft = rfdetr_nb.RFDETRNano(pretrain_weights=None, num_classes=3, device='cpu')
    ft.model.class_names = names
    ft.export_for_roboflow(tmp_path)
    back = rfdetr_nb.RFDETR.from_checkpoint(tmp_path / 'weights.pt', device='cpu')
    assert type(back).__name__ == 'RFDETRNano' and back.class_names == names
    assert back.model.model.class_embed.out_features == 4
    det = back.predict(images()[0], threshold=0.0)
    assert set(det.data['class_name']) <= set(names) | {'class_3'}
    coco = rf.predict(images()[0], threshold=0.0)
    from rfdetr_nb.api import COCO_CLASSES
    assert all(COCO_CLASSES.get(int(i), f'class_{i}') == n for i, n in zip(coco.class_id, coco.data['class_name']))

def test_checkpoint_without_names_warns(tmp_path):
    m = rfdetr_nb.RFDETRNano(pretrain_weights=None, num_classes=3, device='cpu')
    torch.save({'model': m.model.model.state_dict()}, tmp_path / 'rfdetr_nano_ft.pth')
    back = rfdetr_nb.RFDETR.from_checkpoint(tmp_path / 'rfdetr_nano_ft.pth', device='cpu')   # class from the file name
    with pytest.warns(UserWarning, match='no class names'):
        assert back.class_names == ['class_0', 'class_1', 'class_2']

def test_predict_url(tmp_path):
    "http(s) images are downloaded (local server on 127.0.0.1), errors name the URL."
    import http.server, threading, functools
    Image.fromarray(images()[0]).save(tmp_path / 'im.png')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rf = rfdetr_nb.RFDETRNano(pretrain_weights=None, device='cpu')
        url = f'http://127.0.0.1:{srv.server_address[1]}'
        assert rf.predict(f'{url}/im.png', threshold=0.0).metadata['source_image'].shape == (240, 320, 3)
        with pytest.raises(ConnectionError, match='missing.png'): rf.predict(f'{url}/missing.png')
    finally: srv.shutdown()

def test_small_predict_all_queries_match_reference(tmp_path):
    "Every query at threshold 0 (near-tied two-stage proposals included): the reference's detections, bit for bit."
    import rfdetr
    ref, ns = reference_model('small')
    path = str(save_official(ref, ns, tmp_path / 'small.pth'))
    im = images()[0]
    a = rfdetr.RFDETRSmall(pretrain_weights=path, device='cpu').predict(im, threshold=0.0)
    b = rfdetr_nb.RFDETRSmall(pretrain_weights=path, device='cpu').predict(im, threshold=0.0)
    assert len(b) == 300
    assert_same(a, b)
