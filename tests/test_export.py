"""ONNX export of a full-size model: ONNX Runtime against PyTorch's export-mode outputs and against the reference
rfdetr==1.11.2's own ONNX file of the same weights; the ONNX Runtime predictor against `RFDETR.predict`."""
import warnings
import numpy as np
import onnx
import pytest
import torch
from oracle import reference_model, save_official
from fitted import SEG_SHAPE, assert_same_segments, seg_detector, seg_images
import rfdetr_nb
from rfdetr_nb.backbone import fast_kernels
from rfdetr_nb.export import OnnxPredictor, export_network, max_abs_errors, onnx_session, read_metadata


@pytest.fixture(scope='module')
def nano(tmp_path_factory):
    "The reference and rfdetr_nb Nano from one random-weight official checkpoint, and a folder for the files."
    import rfdetr
    ref, ns = reference_model('nano')
    d = tmp_path_factory.mktemp('export')
    path = str(save_official(ref, ns, d / 'nano.pth'))
    ours = rfdetr_nb.RFDETRNano(pretrain_weights=path, device='cpu')
    ours.model.class_names = [f'thing {i}' for i in range(91)]
    return rfdetr.RFDETRNano(pretrain_weights=path, device='cpu'), ours, d

@pytest.fixture(scope='module')
def nano_onnx(nano):
    "Our static batch-1 Nano ONNX file."
    _, ours, d = nano
    return ours.export(d / 'ours', verbose=False)

def io_of(path):
    "(name, shape) of every graph input and output."
    g = onnx.load(str(path), load_external_data=False).graph
    dims = lambda v: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]
    return [(v.name, dims(v)) for v in [*g.input, *g.output]]

def test_same_interface_and_numbers_as_reference_onnx(nano, nano_onnx):
    ref, _, d = nano
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref_path = ref.export(output_dir=str(d / 'ref'), verbose=False)
    assert nano_onnx.name == ref_path.name == 'rfdetr-nano.onnx'
    assert io_of(nano_onnx) == io_of(ref_path) == [('input', [1, 3, 384, 384]), ('dets', [1, 300, 4]), ('labels', [1, 300, 91])]
    x = {'input': torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0)).numpy()}
    for a, b in zip(onnx_session(nano_onnx).run(None, x), onnx_session(ref_path).run(None, x)):
        np.testing.assert_allclose(a, b, atol=1e-4)

def test_static_onnx_matches_pytorch(nano, nano_onnx):
    _, ours, _ = nano
    errs = max_abs_errors(nano_onnx, export_network(ours, (384, 384)), torch.randn(1, 3, 384, 384))
    assert max(errs.values()) <= 1e-4, errs

def test_dynamic_non_square_onnx_matches_pytorch(nano):
    _, ours, d = nano
    path = ours.export(d / 'wide', shape=(320, 448), dynamic_batch=True, verbose=False)
    assert io_of(path)[0] == ('input', ['batch', 3, 320, 448])
    net = export_network(ours, (320, 448))
    for b in (1, 2, 3):
        errs = max_abs_errors(path, net, torch.randn(b, 3, 320, 448))
        assert max(errs.values()) <= 1e-4, (b, errs)
    meta = read_metadata(path)
    assert (meta['model_size'], meta['input_shape'], meta['resolution'], meta['patch_size']) == ('rfdetr-nano', [320, 448], 384, 16)

def test_predictor_matches_predict(nano, nano_onnx):
    _, ours, _ = nano
    rng = np.random.default_rng(0)
    ims = [(rng.random((240, 320, 3)) * 255).astype(np.uint8), (rng.random((300, 200, 3)) * 255).astype(np.uint8)]
    want = ours.predict(ims, threshold=0.05)
    got = OnnxPredictor(nano_onnx, threads=2).predict(ims, threshold=0.05)
    for g, w in zip(got, want):
        assert len(g) == len(w) > 0
        np.testing.assert_allclose(g.xyxy, w.xyxy, atol=1e-3)
        np.testing.assert_allclose(g.confidence, w.confidence, atol=1e-4)
        np.testing.assert_array_equal(g.class_id, w.class_id)
        np.testing.assert_array_equal(g.data['class_name'], w.data['class_name'])
        assert g.mask is None
    assert str(got[0].data['class_name'][0]).startswith('thing ')

def test_infer_dir_images_trace_a_batch(tmp_path):
    "Sample images from `infer_dir` (fewer than the batch: repeated) trace a static batch-3 file that matches PyTorch."
    from PIL import Image
    from rfdetr_nb.api import tiny_detector
    for i in range(2): Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(tmp_path / f'{i}.png')
    rf = tiny_detector()
    path = rf.export(tmp_path / 'out', infer_dir=tmp_path, batch_size=3, verbose=False)
    assert io_of(path)[0] == ('input', [3, 3, 64, 64])
    assert max(max_abs_errors(path, export_network(rf, (64, 64)), torch.randn(3, 3, 64, 64)).values()) <= 1e-4
    got = OnnxPredictor(path).predict([np.zeros((30, 40, 3), np.uint8)] * 4, threshold=0.0)   # 4 images: chunks of 3, padded
    assert [len(d) for d in got] == [10] * 4


@pytest.fixture(scope='module')
def seg(tmp_path_factory):
    "A tiny random-weight segmentation model and its dynamic-batch ONNX file of a non-square shape."
    rf = seg_detector()
    return rf, rf.export(tmp_path_factory.mktemp('seg'), shape=SEG_SHAPE, dynamic_batch=True, verbose=False)

def test_seg_onnx_has_masks_matching_pytorch(seg):
    "A segmentation model's file adds `masks` [B,Q,H/4,W/4] (logits) and says it segments; ORT equals PyTorch within 1e-4."
    rf, path = seg
    assert io_of(path) == [('input', ['batch', 3, 64, 96]), ('dets', ['batch', 10, 4]), ('labels', ['batch', 10, 4]),
                           ('masks', ['batch', 10, 16, 24])]
    assert read_metadata(path)['segmentation'] is True
    net = export_network(rf, SEG_SHAPE)
    for b in (1, 2):
        errs = max_abs_errors(path, net, torch.randn(b, 3, *SEG_SHAPE, generator=torch.Generator().manual_seed(b)))
        assert max(errs.values()) <= 1e-4, (b, errs)

def test_seg_predictor_masks_match_predict(seg):
    """OnnxPredictor's masks come out of `predict`'s own PostProcess: [K,h,w] bool at each image's size, as `RFDETR.predict`'s.
    The mask logits agree to ~1e-5, so only a pixel whose upsampled logit is that close to 0 could flip: IoU ≥ 0.99."""
    rf, path = seg
    p = OnnxPredictor(path)
    assert p.segments and p.outputs == ['dets', 'labels', 'masks']
    assert_same_segments(p.predict(seg_images(), threshold=0.0), rf.predict(seg_images(), threshold=0.0, shape=SEG_SHAPE))

def test_seg_file_without_masks_is_refused(seg, tmp_path):
    "A file whose metadata says it segments but has no `masks` output fails with a clear error, not a detector without masks."
    _, path = seg
    m = onnx.load(str(path))
    m.graph.output.remove(next(o for o in m.graph.output if o.name == 'masks'))
    onnx.save(m, str(tmp_path / 'cut.onnx'))
    with pytest.raises(ValueError, match="segmentation model's export .* no 'masks' output"): OnnxPredictor(tmp_path / 'cut.onnx')
