"""TFLite for real: a tiny detector fitted to one synthetic scene (`fitted.py`: why fitted) is exported with
`format='tflite'`, converted by onnx2tf and run in the LiteRT interpreter — float32 and float16 against ONNX
Runtime, int8 keeping the detections.

The conversion must not depend on the `onnxsim` module, which is onnx2tf's `onnxsim-prebuilt` or the `onnxsim` 0.8
that `rfdetr[onnx]` installs (the dev extra has both): the fixture converts with `onnxsim` unimportable."""
import sys
from unittest import mock
import numpy as np
import pytest
from PIL import Image
from fitted import (SEG_SHAPE, assert_same_segments, fitted_detector, keeps_detections, noisy_scenes, scene, scores, seg_calibration,
                    seg_detector, seg_images, seg_input)
from rfdetr_nb.export import onnx_layout, onnx_session, run_tflite, tflite_paths, OnnxPredictor, TFLitePredictor

pytest.importorskip('onnx2tf')   # the export extra; .ci/run installs it, so there this never skips

@pytest.fixture(scope='module')
def fitted(): return fitted_detector()

@pytest.fixture(scope='module')
def exported(fitted, tmp_path_factory):
    "The fitted detector exported to TFLite with an int8 file calibrated on the scene and noisy copies of it."
    rf, x = fitted
    cal = noisy_scenes()
    d = tmp_path_factory.mktemp('tflite')
    with pytest.MonkeyPatch.context() as mp:                         # whichever onnxsim is installed, none is used
        mp.setitem(sys.modules, 'onnxsim', None)                     # (only this key is restored: TensorFlow stays imported)
        int8 = rf.export(d, format='tflite', quantization='int8', calibration_data=cal, verbose=False)
    onnx_path = d / 'inference_model.onnx'
    want = dict(zip(['dets', 'labels'], onnx_session(onnx_path).run(None, {'input': x})))
    return int8, tflite_paths(onnx_path), x, want

def test_files(exported):
    int8, files, _, _ = exported
    assert int8 == files['int8'] and int8.name == 'inference_model.int8.tflite'
    assert all(f.is_file() for f in files.values()) and (int8.parent / 'inference_model.onnx').is_file()
    assert files['fp16'].stat().st_size < 0.75 * files['fp32'].stat().st_size

def test_fp32_matches_onnxruntime(exported):
    _, files, x, want = exported
    got = run_tflite(files['fp32'], x)
    for k in ('dets', 'labels'): assert np.abs(got[k] - want[k]).max() <= 1e-3, k

def test_fp16_matches_onnxruntime(exported):
    "Half-precision weights: boxes and scores within 1e-2 (the fitted model's logits reach ~±10, 1e-3 relative)."
    _, files, x, want = exported
    got = run_tflite(files['fp16'], x)
    assert np.abs(got['dets'] - want['dets']).max() <= 1e-2
    assert np.abs(scores(got['labels']) - scores(want['labels'])).max() <= 1e-2

def test_int8_keeps_the_detections(exported):
    _, files, x, want = exported
    assert keeps_detections(want, run_tflite(files['int8'], x))

def test_tflite_predictor_matches_onnx_predictor(exported):
    "TFLitePredictor: `predict`'s pre- and post-processing around the float32 file, names from the ONNX file beside it."
    _, files, _, _ = exported
    want = OnnxPredictor(files['fp32'].with_name('inference_model.onnx')).predict(scene(), threshold=0.5)
    got = TFLitePredictor(files['fp32']).predict([scene(), scene()], threshold=0.5)    # a list: chunks of the fixed batch
    assert len(want) >= 1
    for g in got:
        assert list(g.data['class_name']) == list(want.data['class_name'])
        np.testing.assert_allclose(g.xyxy, want.xyxy, atol=0.1)          # pixels of the 64-px image
        np.testing.assert_allclose(g.confidence, want.confidence, atol=1e-3)

def test_cli_exports_tflite(fitted, tmp_path, capsys):
    "`rfdetr-nb export --format tflite --quantization int8 --calibration DIR` writes the ONNX file and the three TFLite files."
    from rfdetr_nb import cli
    rf, _ = fitted
    (tmp_path / 'cal').mkdir()
    Image.fromarray(scene()).save(tmp_path / 'cal' / 'scene.png')
    with mock.patch.object(cli, 'load_detector', lambda *a, **k: rf):
        cli.main(['export', '--model', 'nano', '--format', 'tflite', '--quantization', 'int8',
                  '--calibration', str(tmp_path / 'cal'), '--out', str(tmp_path / 'out')])
    files = tflite_paths(tmp_path / 'out' / 'inference_model.onnx')
    assert all(f.is_file() for f in files.values()) and (tmp_path / 'out' / 'inference_model.onnx').is_file()
    assert str(files['int8']) in capsys.readouterr().out
    assert len(TFLitePredictor(files['int8']).predict(scene(), threshold=0.3)) >= 1

def test_backbone_only_tflite(fitted, tmp_path):
    "`backbone_only=True` converts too: the `features` map of the float32 file matches ONNX Runtime's."
    rf, x = fitted
    path = rf.export(tmp_path, backbone_only=True, format='tflite', verbose=False)
    assert path.name == 'inference_model-backbone.fp32.tflite'
    want = onnx_session(tmp_path / 'inference_model-backbone.onnx').run(None, {'input': x})[0]
    got = run_tflite(path, x)['features']
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-3


@pytest.fixture(scope='module')
def seg_tflite(tmp_path_factory):
    "A tiny random-weight segmentation model converted to TFLite at a non-square shape (fp32, fp16, int8), an input and ORT's outputs."
    rf = seg_detector()
    d = tmp_path_factory.mktemp('seg_tflite')
    rf.export(d, shape=SEG_SHAPE, format='tflite', quantization='int8', calibration_data=seg_calibration(), verbose=False)
    x = seg_input()
    want = dict(zip(['dets', 'labels', 'masks'], onnx_session(d / 'inference_model.onnx').run(None, {'input': x})))
    return rf, tflite_paths(d / 'inference_model.onnx'), x, want

def test_seg_masks_in_every_tflite_file(seg_tflite):
    """Each file has `masks` in the ONNX layout [B,Q,H/4,W/4] (onnx2tf 2.4 keeps it; `onnx_layout` would transpose a channels-last one).
    fp32 logits equal ORT's within 1e-4 (measured 7e-6); fp16 within 0.1 (measured 0.015 on logits up to ~10: float16
    weights) with ≥ 99% of the pixels on the same side of 0 (measured 99.95%); int8, on random weights, only runs with
    masks of the right shape (≥ 80% of the pixels agree, measured 90%: random weights give int8 near ties, see `fitted.py`)."""
    _, files, x, want = seg_tflite
    agree = {}
    for q, f in files.items():
        got = run_tflite(f, x)
        assert got['masks'].shape == want['masks'].shape == (1, 10, 16, 24), q
        agree[q] = ((got['masks'] > 0) == (want['masks'] > 0)).mean()
        if q == 'fp32': assert np.abs(got['masks'] - want['masks']).max() <= 1e-4
        if q == 'fp16': assert np.abs(got['masks'] - want['masks']).max() <= 0.1
    assert agree['fp32'] == 1 and agree['fp16'] >= 0.99 and agree['int8'] >= 0.8, agree

def test_seg_tflite_predictor_masks_match_predict(seg_tflite):
    "TFLitePredictor (fp32): `predict`'s PostProcess on the file's masks gives `RFDETR.predict`'s classes, scores and masks (IoU ≥ 0.99, measured 1.0)."
    rf, files, _, _ = seg_tflite
    p = TFLitePredictor(files['fp32'])
    assert p.segments
    assert_same_segments(p.predict(seg_images(), threshold=0.0), rf.predict(seg_images(), threshold=0.0, shape=SEG_SHAPE))
    assert len(TFLitePredictor(files['int8']).predict(seg_images()[0], threshold=0.0).mask) == 10

def test_onnx_layout():
    "A channels-last 4-D output is transposed back to the ONNX file's [B,C,H,W]; a shape that fits neither layout is an error."
    a = np.arange(2 * 16 * 24 * 10, dtype=np.float32).reshape(2, 16, 24, 10)
    out = onnx_layout({'masks': a, 'dets': np.zeros((2, 10, 4))}, {'masks': [2, 10, 16, 24], 'dets': [2, 10, 4]})
    np.testing.assert_array_equal(out['masks'], a.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match='neither layout'): onnx_layout({'masks': a}, {'masks': [2, 10, 8, 8]})
