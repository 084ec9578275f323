"""The segmentation API against the reference rfdetr==1.11.2 `predict`: one random-weight official-format checkpoint
loaded by both; the same boxes, scores and class ids, and pixel-identical masks."""
import numpy as np
import pytest
from PIL import Image
from oracle import reference_model, save_official
import rfdetr_nb
from test_api import images, assert_same


def assert_same_masks(a, b):
    "The same detections (bit-identical) with pixel-identical masks."
    assert_same(a, b)
    assert a.mask.shape == b.mask.shape and a.mask.dtype == b.mask.dtype == np.bool_
    np.testing.assert_array_equal(a.mask, b.mask)
    assert list(b.data['class_name']) == [b.data['class_name'][i] for i in range(len(b))]

@pytest.fixture(scope='module')
def seg_nano_ckpt(tmp_path_factory):
    "A random-weight SegNano saved as an official checkpoint (a file name that tells its variant)."
    ref, ns = reference_model('seg_nano')
    return str(save_official(ref, ns, tmp_path_factory.mktemp('w') / 'seg_nano.pth'))

@pytest.fixture(scope='module')
def seg_nano_pair(seg_nano_ckpt):
    "Reference and rfdetr_nb SegNano loaded from one checkpoint."
    import rfdetr
    return (rfdetr.RFDETRSegNano(pretrain_weights=seg_nano_ckpt, device='cpu'),
            rfdetr_nb.RFDETRSegNano(pretrain_weights=seg_nano_ckpt, device='cpu'))

@pytest.mark.parametrize('kind', ['single', 'batch', 'shape'])
def test_seg_predict_matches_reference(seg_nano_pair, kind):
    ref, ours = seg_nano_pair
    ims, t = images(), 0.02
    if kind == 'single': assert_same_masks(ref.predict(ims[0], threshold=t), ours.predict(ims[0], threshold=t))
    if kind == 'batch':
        for a, b in zip(ref.predict(ims, threshold=t), ours.predict(ims, threshold=t)): assert_same_masks(a, b)
    if kind == 'shape':
        im = Image.fromarray(ims[1])
        assert_same_masks(ref.predict(im, threshold=t, shape=(336, 240)), ours.predict(im, threshold=t, shape=(336, 240)))

def test_seg_all_queries_match_reference(seg_nano_pair):
    "At threshold 0 all 100 selected masks, full size, pixel for pixel."
    ref, ours = seg_nano_pair
    a, b = ref.predict(images()[0], threshold=0.0), ours.predict(images()[0], threshold=0.0)
    assert len(b) == 100
    assert_same_masks(a, b)

def test_from_checkpoint_picks_seg_class(seg_nano_ckpt):
    rf = rfdetr_nb.RFDETR.from_checkpoint(seg_nano_ckpt, device='cpu')
    assert type(rf) is rfdetr_nb.RFDETRSegNano and rf.model.model.segmentation_head is not None

def test_task_mismatch_errors(seg_nano_ckpt, tmp_path):
    with pytest.raises(ValueError, match='holds a segmentation model but this is a detection model: load it with RFDETRSegNano'):
        rfdetr_nb.RFDETRNano(pretrain_weights=seg_nano_ckpt, device='cpu')
    ref, ns = reference_model('nano')
    det = str(save_official(ref, ns, tmp_path / 'nano.pth'))
    with pytest.raises(ValueError, match='holds a detection model but this is a segmentation model: load it with RFDETRNano'):
        rfdetr_nb.RFDETRSegNano(pretrain_weights=det, device='cpu')

def test_seg_small_all_queries_match_reference(tmp_path):
    "SegSmall (384 px, 100 queries) at threshold 0: every selected mask pixel-identical."
    import rfdetr
    ref_model, ns = reference_model('seg_small')
    path = str(save_official(ref_model, ns, tmp_path / 'seg_small.pth'))
    ref, ours = rfdetr.RFDETRSegSmall(pretrain_weights=path, device='cpu'), rfdetr_nb.RFDETR.from_checkpoint(path, device='cpu')
    assert type(ours) is rfdetr_nb.RFDETRSegSmall
    im = images()[1]
    a, b = ref.predict(im, threshold=0.0), ours.predict(im, threshold=0.0)
    assert len(b) == 100
    assert_same_masks(a, b)

def test_saved_seg_model_reloads(seg_nano_pair, tmp_path):
    "A Seg model written by export_for_roboflow comes back as its class (by `model_name`) with the same predictions."
    _, ours = seg_nano_pair
    path = ours.export_for_roboflow(tmp_path) / 'weights.pt'
    back = rfdetr_nb.RFDETR.from_checkpoint(path, device='cpu')
    assert type(back) is rfdetr_nb.RFDETRSegNano
    im = images()[0]
    assert_same_masks(ours.predict(im, threshold=0.02), back.predict(im, threshold=0.02))

@pytest.mark.parametrize('compile', [False, True])
def test_seg_optimized_predict_matches_reference(seg_nano_pair, compile):
    "The optimised (export-mode, optionally traced) Seg model gives the reference's masks too."
    ref, ours = seg_nano_pair
    im = images()[0]
    ours.optimize_for_inference(compile=compile, dtype='float32')
    try: assert_same_masks(ref.predict(im, threshold=0.02), ours.predict(im, threshold=0.02))
    finally: ours.remove_optimized_model()
