"""OpenVINO for real: the tiny detector fitted to one synthetic scene (`fitted.py`) is exported with
`format='openvino'` in float32, bfloat16 and int8 (NNCF) and run on OpenVINO's CPU plugin — float32 against ONNX
Runtime, bfloat16 and int8 keeping the detections — and `OpenVinoPredictor` against `OnnxPredictor`."""
import numpy as np
import pytest
from fitted import (SEG_SHAPE, assert_same_segments, fitted_detector, keeps_detections, noisy_scenes, scene, seg_calibration,
                    seg_detector, seg_images, seg_input)
from rfdetr_nb.export import (OPENVINO_HINTS, OnnxPredictor, OpenVinoPredictor, export_openvino, onnx_session, openvino_paths,
                              openvino_runtime)

ov = pytest.importorskip('openvino')   # the openvino extra; .ci/run installs it (dev), so there this never skips

@pytest.fixture(scope='module')
def fitted(): return fitted_detector()

@pytest.fixture(scope='module')
def exported(fitted, tmp_path_factory):
    "The fitted detector's ONNX file, its three OpenVINO files (int8 calibrated on noisy scenes), an input and ORT's outputs."
    rf, x = fitted
    d = tmp_path_factory.mktemp('openvino')
    int8 = rf.export(d, format='openvino', quantization='int8', calibration_data=noisy_scenes(), verbose=False)
    onnx_path = d / 'inference_model.onnx'
    for q in ('fp32', 'bf16'): export_openvino(onnx_path, q, verbose=False)
    want = dict(zip(['dets', 'labels'], onnx_session(onnx_path).run(None, {'input': x})))
    return int8, openvino_paths(onnx_path), x, want

def run(path, x, precision, names=('dets', 'labels')):
    "Outputs `names` of the OpenVINO file `path` on `x`, compiled with `precision`'s inference hint."
    core = openvino_runtime().Core()
    out = core.compile_model(str(path), 'CPU', {'INFERENCE_PRECISION_HINT': OPENVINO_HINTS[precision]}).create_infer_request().infer({0: x})
    return {k: out[k] for k in names}

def test_files(exported):
    int8, files, _, _ = exported
    assert int8 == files['int8'] and int8.name == 'inference_model.int8.xml'
    assert all(f.is_file() and f.with_suffix('.bin').is_file() for f in files.values())
    size = {q: f.with_suffix('.bin').stat().st_size for q, f in files.items()}
    assert size['bf16'] < 0.75 * size['fp32']               # float16 weights

def test_fp32_matches_onnxruntime(exported):
    _, files, x, want = exported
    got = run(files['fp32'], x, 'fp32')
    for k in ('dets', 'labels'): assert np.abs(got[k] - want[k]).max() <= 1e-4, k

def test_bf16_and_int8_keep_the_detections(exported):
    _, files, x, want = exported
    for q in ('bf16', 'int8'): assert keeps_detections(want, run(files[q], x, q)), q

def test_predictor_matches_onnx_predictor(exported):
    "OpenVinoPredictor: `predict`'s pre- and post-processing around each file; float32 gives ONNX Runtime's detections."
    _, files, _, _ = exported
    want = OnnxPredictor(files['fp32'].with_name('inference_model.onnx')).predict(scene(), threshold=0.5)
    assert len(want) >= 1
    for q, f in files.items():
        for g in OpenVinoPredictor(f, threads=2).predict([scene(), scene()], threshold=0.5):   # a list: batches of one
            assert list(g.data['class_name']) == list(want.data['class_name']), q
            np.testing.assert_allclose(g.xyxy, want.xyxy, atol=0.1 if q == 'fp32' else 2)         # pixels of the 64-px image
            np.testing.assert_allclose(g.confidence, want.confidence, atol=1e-4 if q == 'fp32' else 0.1)

def test_dynamic_batch(fitted, tmp_path):
    "A dynamic-batch export runs a list of three images in one call, as the ONNX file does."
    rf, _ = fitted
    xml = rf.export(tmp_path, format='openvino', dynamic_batch=True, verbose=False)
    p = OpenVinoPredictor(xml)
    assert p.batch_size is None
    want = OnnxPredictor(tmp_path / 'inference_model.onnx').predict([scene()] * 3, threshold=0.5)
    for g, w in zip(p.predict([scene()] * 3, threshold=0.5), want): np.testing.assert_allclose(g.xyxy, w.xyxy, atol=0.1)


@pytest.fixture(scope='module')
def seg_openvino(tmp_path_factory):
    "A tiny random-weight segmentation model's ONNX file and its three OpenVINO files, at a non-square shape."
    rf = seg_detector()
    d = tmp_path_factory.mktemp('seg_openvino')
    rf.export(d, shape=SEG_SHAPE, format='openvino', quantization='int8', calibration_data=seg_calibration(), verbose=False)
    for q in ('fp32', 'bf16'): export_openvino(d / 'inference_model.onnx', q, verbose=False)
    return rf, d / 'inference_model.onnx', openvino_paths(d / 'inference_model.onnx')

def test_seg_masks_in_every_openvino_file(seg_openvino):
    """fp32 `masks` logits equal ORT's within 1e-4 (measured 6e-6); bf16 keeps ≥ 98% of the pixels on the same side of 0
    (measured 99.5%: bfloat16 has 8 bits of mantissa); int8, on random weights, runs with masks of the right shape (≥ 80%
    agree, measured 93%)."""
    _, onnx_path, files = seg_openvino
    x = seg_input()
    want = onnx_session(onnx_path).run(['masks'], {'input': x})[0]
    out = {q: run(f, x, q, ('masks',))['masks'] for q, f in files.items()}
    assert all(m.shape == want.shape == (1, 10, 16, 24) for m in out.values())
    assert np.abs(out['fp32'] - want).max() <= 1e-4
    agree = {q: ((m > 0) == (want > 0)).mean() for q, m in out.items()}
    assert agree['bf16'] >= 0.98 and agree['int8'] >= 0.8, agree

def test_seg_openvino_predictor_masks_match_predict(seg_openvino):
    "OpenVinoPredictor (fp32): `predict`'s PostProcess on the file's masks gives `RFDETR.predict`'s classes, scores and masks (IoU ≥ 0.99, measured 1.0)."
    rf, _, files = seg_openvino
    p = OpenVinoPredictor(files['fp32'], threads=2)
    assert p.segments
    assert_same_segments(p.predict(seg_images(), threshold=0.0), rf.predict(seg_images(), threshold=0.0, shape=SEG_SHAPE))
