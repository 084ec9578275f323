"""The reference `rfdetr==1.11.2` as a numerical oracle: random-weight models saved as official checkpoints."""
import argparse, copy, os, warnings
import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')

try:
    with warnings.catch_warnings():   # the reference scripts a function with torch.jit.script at import (deprecated in 2.14)
        warnings.filterwarnings('ignore', '`torch.jit.script` is deprecated', FutureWarning)
        import rfdetr  # noqa: F401
except ImportError:
    if os.environ.get('CI'): raise  # CI installs the oracle: a missing one must fail, not skip
    pytest.skip('the reference rfdetr==1.11.2 is not installed (pip install -e ".[dev]")', allow_module_level=True)

VARIANTS = dict(nano='RFDETRNano', small='RFDETRSmall', medium='RFDETRMedium', large='RFDETRLarge',
                base='RFDETRBase', large_deprecated='RFDETRLargeDeprecated',
                seg_preview='RFDETRSegPreview', seg_nano='RFDETRSegNano', seg_small='RFDETRSegSmall',
                seg_medium='RFDETRSegMedium', seg_large='RFDETRSegLarge', seg_xlarge='RFDETRSegXLarge',
                seg_2xlarge='RFDETRSeg2XLarge')

@torch.no_grad()
def reference_model(variant, seed=0, **overrides):
    "Reference `LWDETR` for `variant` with random weights, every parameter perturbed so no path stays at its zero init."
    from rfdetr import config
    from rfdetr._namespace import _namespace_from_configs
    from rfdetr.models.lwdetr import build_model
    mc = getattr(config, VARIANTS[variant] + 'Config')(pretrain_weights=None, device='cpu', **overrides)
    ns = _namespace_from_configs(mc, config.TrainConfig(dataset_dir='.', output_dir='.'))
    ns.pretrain_weights = 'random-init'  # any non-empty name stops the DINOv2 hub download for p=14 variants
    torch.manual_seed(seed)
    model = build_model(ns)
    model = model[0] if isinstance(model, tuple) else model
    for p in model.parameters(): p.add_(torch.randn_like(p) * 0.02)
    return model.eval(), ns

def save_official(model, ns, path, **extra_args):
    "Save `model` like an official RF-DETR checkpoint: weights under `model`, training args as a Namespace."
    args = argparse.Namespace(**{k: getattr(ns, k) for k in ('num_classes', 'num_queries', 'group_detr', 'patch_size')}, **extra_args)
    torch.save({'model': model.state_dict(), 'args': args}, path)
    return path

def exported(model):
    "A deep copy of the reference model in export mode."
    model = copy.deepcopy(model)
    model.export()
    return model
