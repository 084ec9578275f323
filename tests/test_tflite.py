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
from fitted import fitted_detector, keeps_detections, noisy_scenes, scene, scores
from rfdetr_nb.export import onnx_session, run_tflite, tflite_paths, OnnxPredictor, TFLitePredictor

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
