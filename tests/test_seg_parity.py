"""Parity of the segmentation variants with the reference rfdetr==1.11.2: the same weights in, the same logits, boxes
and mask logits out (final, aux and encoder outputs), in evaluation, training and export."""
import copy
import pytest
import torch
from oracle import reference_model, exported
from test_parity import max_diff, EXPORT_TOL
from rfdetr_nb.config import variant_config, tiny_config
from rfdetr_nb.model import LWDETR

# total parameters (all 13 groups, 91 logit slots), from the spec's measured table
PARAMS = dict(seg_preview=34_153_555, seg_nano=33_577_475, seg_small=33_711_107, seg_medium=35_694_259,
              seg_large=35_873_971, seg_xlarge=38_113_635, seg_2xlarge=38_648_163)
CI = ('seg_nano', 'seg_small')   # ~40 s each; the other five (up to 768 px) are marked slow
slow = pytest.mark.slow   # deselected by .ci/run (-m 'not slow'); `pytest -m slow tests` runs them

def outputs(out):
    "(name, tensor) for every logits, boxes and masks tensor of an output dict; sparse masks give each factor."
    heads = [('', out), *((f'aux_outputs[{i}].', a) for i, a in enumerate(out['aux_outputs'])),
             ('enc_outputs.', out['enc_outputs'])]
    for p, o in heads:
        for k in ('pred_logits', 'pred_boxes', 'pred_masks'):
            if isinstance(o[k], dict): yield from ((f'{p}{k}.{f}', t) for f, t in o[k].items())
            else: yield p + k, o[k]

def assert_outputs_equal(ref, ours):
    "Every tensor of `ref` and `ours`, bit-identical (same names, shapes and values)."
    r, o = dict(outputs(ref)), dict(outputs(ours))
    assert list(r) == list(o)
    for k in r: assert r[k].shape == o[k].shape and max_diff(r[k], o[k]) == 0.0, k

@pytest.mark.parametrize('variant', [*CI, *(pytest.param(v, marks=slow) for v in PARAMS if v not in CI)])
def test_seg_parity(variant):
    ref, _ = reference_model(variant)
    model = LWDETR(variant_config('rfdetr-' + variant.replace('_', '-')))
    model.load_state_dict(ref.state_dict())                      # strict: the same keys and shapes
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters()) == PARAMS[variant]
    model.eval()
    res, block = model.cfg.resolution, model.cfg.block_size
    Q, r = model.cfg.num_queries, model.cfg.mask_downsample_ratio
    torch.manual_seed(1)
    with torch.no_grad():
        for h, w in [(res, res), (res - block, res + block)]:          # square and non-square
            x = torch.randn(1, 3, h, w)
            o = model(x)
            assert o['pred_masks'].shape == (1, Q, h // r, w // r)
            assert_outputs_equal(ref(x), o)
    x = torch.randn(1, 3, res, res)
    ref.train(); model.train()                                   # all 13 groups, sparse masks, autograd on
    o = model(x)
    assert o['pred_masks']['query_features'].shape == (1, Q * 13, model.cfg.hidden_dim)
    assert o['pred_masks']['spatial_features'].requires_grad
    assert_outputs_equal(ref(x), o)
    ref.eval(); model.eval()
    with torch.no_grad():
        want = exported(ref)(x)                                  # (boxes, logits, masks) of the last layer
        for a, b in zip(want, copy.deepcopy(model).export(portable=False)(x)): assert max_diff(a, b) == 0.0
        # the portable export samples with a gather (see test_parity): rounding only, relative to the masks' scale
        ob, ol, om = copy.deepcopy(model).export()(x)
        assert max_diff(want[0], ob) < EXPORT_TOL and max_diff(want[1], ol) < EXPORT_TOL
        assert max_diff(want[2], om) < EXPORT_TOL * want[2].abs().max()

def test_detection_has_no_mask_head():
    "A detection model builds no mask head and returns no masks: it does none of the mask work."
    model = LWDETR(tiny_config()).eval()
    assert model.segmentation_head is None and not any('segmentation' in k for k in model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(): out = model(x)
    assert 'pred_masks' not in out and 'pred_masks' not in out['enc_outputs']
    assert 'pred_masks' not in model.train()(x)['enc_outputs'] and len(model.eval().export()(x)) == 2
