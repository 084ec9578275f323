"""Build reference `rfdetr==1.11.2` models with random weights, to use as a numerical oracle."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')

REF_CONFIGS = dict(nano='RFDETRNanoConfig', small='RFDETRSmallConfig', medium='RFDETRMediumConfig',
                   large='RFDETRLargeConfig', base='RFDETRBaseConfig', large_deprecated='RFDETRLargeDeprecatedConfig')

def reference_model(variant, **overrides):
    "Reference `LWDETR` for `variant` built with random weights (nothing downloaded)"
    import torch
    from rfdetr import config
    from rfdetr._namespace import _namespace_from_configs
    from rfdetr.models.lwdetr import build_model
    mc = getattr(config, REF_CONFIGS[variant])(pretrain_weights=None, device='cpu', **overrides)
    ns = _namespace_from_configs(mc, config.TrainConfig(dataset_dir='.', output_dir='.'))
    ns.pretrain_weights = 'random-init'  # any non-empty name stops the DINOv2 hub download for p=14 variants
    torch.manual_seed(0)
    model = build_model(ns)
    return (model[0] if isinstance(model, tuple) else model).eval(), ns
