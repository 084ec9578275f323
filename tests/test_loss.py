"""Parity of `rfdetr_nb.loss.DetrLoss` with the reference rfdetr==1.11.2 matcher + SetCriterion (IA-BCE, query groups, masks)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import oracle  # noqa: F401  (the reference rfdetr: skipped without it, a failure in CI)
from rfdetr.models.matcher import HungarianMatcher
from rfdetr.models.criterion import SetCriterion
from torchvision.ops import box_convert
from rfdetr_nb.config import tiny_config
from rfdetr_nb.loss import DetrLoss
from rfdetr_nb.model import LWDETR

GROUPS, TOL, GRAD_TOL = 13, 1e-4, 1e-5

def reference_criterion(num_slots, dec_layers, train, groups=GROUPS, masks=False):
    "The reference criterion as its trainer builds it (IA-BCE, aux and encoder terms); `masks`: its segmentation recipe."
    layer = {'loss_ce': 1.0, 'loss_bbox': 5.0, 'loss_giou': 2.0} | ({'loss_mask_ce': 5.0, 'loss_mask_dice': 5.0} if masks else {})
    weights = {k + suffix: w for suffix in ['', *(f'_{i}' for i in range(dec_layers - 1)), '_enc'] for k, w in layer.items()}
    mask_costs = dict(cost_mask_ce=5.0, cost_mask_dice=5.0, mask_point_sample_ratio=16) if masks else {}
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, **mask_costs)
    return SetCriterion(num_slots, matcher=matcher, weight_dict=weights, focal_alpha=0.25, group_detr=groups,
                        losses=['labels', 'boxes', 'cardinality'] + (['masks'] if masks else []), ia_bce_loss=True,
                        mask_point_sample_ratio=16).train(train)

def make_targets(sizes, num_slots, seed=0):
    "One target dict per image with `sizes[i]` boxes (0: a background image), plus keys the loss must ignore."
    g = torch.Generator().manual_seed(seed)
    return [{'boxes': torch.cat([torch.rand(n, 2, generator=g) * .6 + .2, torch.rand(n, 2, generator=g) * .3 + .05], -1),
             'labels': torch.randint(0, num_slots, (n,), generator=g), 'image_id': torch.tensor(i),
             'orig_size': torch.tensor([480, 640])} for i, n in enumerate(sizes)]

def model_outputs(cfg, train, batch):
    "Outputs of our tiny LWDETR (all weights perturbed) on random images."
    torch.manual_seed(0)
    model = LWDETR(cfg).train(train)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
    return model(torch.randn(batch, 3, cfg.resolution, cfg.resolution))

def random_outputs(cfg, batch, enc_rows, train=True):
    "Random outputs with spread-out logits; the encoder may have fewer rows per group (few memory tokens)."
    g = torch.Generator().manual_seed(1)
    def layer(rows):
        return {'pred_logits': (torch.randn(batch, rows, cfg.num_classes + 1, generator=g) * 3 - 2).requires_grad_(),
                'pred_boxes': torch.cat([torch.rand(batch, rows, 2, generator=g),
                                         torch.rand(batch, rows, 2, generator=g) * .5 + .02], -1).requires_grad_()}
    rows = cfg.num_queries * (cfg.group_detr if train else 1)
    return {**layer(rows), 'aux_outputs': [layer(rows) for _ in range(cfg.dec_layers - 1)], 'enc_outputs': layer(enc_rows)}

def with_masks(out, train, hm=16, dim=16, seed=2):
    "`out` with random `pred_masks` on every layer: the sparse training form, or `[B,R,Hm,Wm]` logits in evaluation."
    g = torch.Generator().manual_seed(seed)
    for o in [out] + out['aux_outputs'] + [out['enc_outputs']]:
        B, R = o['pred_logits'].shape[:2]
        o['pred_masks'] = ({'spatial_features': torch.randn(B, dim, hm, hm, generator=g).requires_grad_(),
                            'query_features': (torch.randn(B, R, dim, generator=g) * .3).requires_grad_(),
                            'bias': torch.randn(1, generator=g).requires_grad_()} if train
                           else (torch.randn(B, R, hm, hm, generator=g) * 3).requires_grad_())
    return out

def with_target_masks(targets, height=40, width=56, seed=3):
    "`targets` with a bool mask `[N,H,W]` per object: its box filled in, one pixel in ten flipped."
    g = torch.Generator().manual_seed(seed)
    ys, xs = (torch.arange(height) + .5) / height, (torch.arange(width) + .5) / width
    def masks(boxes):
        x0, y0, x1, y1 = box_convert(boxes, 'cxcywh', 'xyxy').T[..., None, None]      # [N,1,1] each
        inside = (xs >= x0) & (xs <= x1) & (ys[:, None] >= y0) & (ys[:, None] <= y1)   # [N,H,W]
        return inside ^ (torch.rand(inside.shape, generator=g) < .1)
    return [{**t, 'masks': masks(t['boxes'])} for t in targets]

def output_tensors(out):
    "Every output tensor of every supervised layer: logits, boxes and, if any, the masks (either form)."
    def layer(o):
        m = o.get('pred_masks', {})
        return [o['pred_logits'], o['pred_boxes'], *(m.values() if isinstance(m, dict) else [m])]
    return [t for o in [out] + out['aux_outputs'] + [out['enc_outputs']] for t in layer(o)]

def max_diff(a, b): return (a - b).abs().max().item()

@pytest.mark.parametrize('case', ['model_train', 'model_eval', 'random_train'])
def test_loss_matches_reference(case):
    cfg = tiny_config(group_detr=GROUPS, dec_layers=3)
    num_slots = cfg.num_classes + 1
    train = case != 'model_eval'
    out = random_outputs(cfg, 3, 7 * GROUPS) if case == 'random_train' else model_outputs(cfg, train, 3)
    assert out['pred_logits'].shape[1] == cfg.num_queries * (GROUPS if train else 1)
    targets = make_targets([4, 0, 9], num_slots)                   # image 1 is a background image
    ref = reference_criterion(num_slots, cfg.dec_layers, train)
    ref_terms = ref(out, targets)
    ref_total = sum(ref.weight_dict[k] * v for k, v in ref_terms.items() if k in ref.weight_dict)
    ref_grads = torch.autograd.grad(ref_total, output_tensors(out))
    loss = DetrLoss(cfg)
    total = loss(out, targets)
    grads = torch.autograd.grad(total, output_tensors(out))
    assert sorted(loss.terms) == sorted(ref_terms)                 # loss_ce, …, loss_ce_0, …, loss_ce_enc, class_error, …
    for k, v in ref_terms.items(): assert max_diff(v.detach(), loss.terms[k]) < TOL, k
    assert max_diff(ref_total, total) < TOL
    for i, (a, b) in enumerate(zip(ref_grads, grads)): assert max_diff(a, b) < GRAD_TOL, i
    assert loss.terms['loss_bbox'] > 0 and grads[0].abs().sum() > 0   # something was matched and trained

def _distributed_worker(rank, world, init, out_dir):
    "One of `world` processes: the loss of its share of the batch, the normaliser all-reduced over processes."
    torch.set_num_threads(1)   # as forked DataLoader workers do: never reuse the parent's OpenMP pool
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    try:
        cfg = tiny_config(group_detr=GROUPS)
        out = random_outputs(cfg, 4, cfg.num_queries * GROUPS)
        share = slice(2 * rank, 2 * rank + 2)
        mine = {'pred_logits': out['pred_logits'][share].detach().requires_grad_(),
                'pred_boxes': out['pred_boxes'][share].detach().requires_grad_()}
        total = DetrLoss(cfg)(mine, make_targets([3, 0, 6, 1], cfg.num_classes + 1)[share])
        torch.save((total.detach(), *torch.autograd.grad(total, [mine['pred_logits'], mine['pred_boxes']])),
                   f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()

def test_distributed_normaliser(tmp_path):
    "Two processes with two images each: their mean loss and averaged gradients are those of one process with all four."
    # forked workers start at once with everything imported (spawned ones would import torch and rfdetr again)
    mp.start_processes(_distributed_worker, args=(2, f'file://{tmp_path}/rendezvous', str(tmp_path)), nprocs=2,
                       start_method='fork')
    cfg = tiny_config(group_detr=GROUPS)
    out = random_outputs(cfg, 4, cfg.num_queries * GROUPS)
    whole = {'pred_logits': out['pred_logits'], 'pred_boxes': out['pred_boxes']}
    total = DetrLoss(cfg)(whole, make_targets([3, 0, 6, 1], cfg.num_classes + 1))
    grads = torch.autograd.grad(total, [whole['pred_logits'], whole['pred_boxes']])
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    assert max_diff(sum(r[0] for r in ranks) / 2, total) < TOL
    for i in (1, 2):   # data-parallel training averages the processes' gradients
        assert max_diff(torch.cat([r[i] for r in ranks]) / 2, grads[i - 1]) < GRAD_TOL

@pytest.mark.parametrize('case', ['random_train', 'random_eval', 'no_targets', 'model_train'])
def test_mask_loss_matches_reference(case):
    "Segmentation, same torch.manual_seed before both: every term, the total, the output gradients and the generator after."
    cfg = tiny_config(group_detr=3, dec_layers=3, segmentation_head=True)
    num_slots, train = cfg.num_classes + 1, case != 'random_eval'
    out = (model_outputs(cfg, train, 2) if case == 'model_train' else
           with_masks(random_outputs(cfg, 2, 7 * cfg.group_detr if train else cfg.num_queries, train), train))
    sizes = {'random_train': [0, 5], 'random_eval': [5, 0], 'no_targets': [0, 0], 'model_train': [3, 2]}[case]
    targets = with_target_masks(make_targets(sizes, num_slots))
    ref = reference_criterion(num_slots, cfg.dec_layers, train, groups=cfg.group_detr, masks=True)
    torch.manual_seed(0)
    ref_terms = ref(out, targets)
    ref_total = sum(ref.weight_dict[k] * v for k, v in ref_terms.items() if k in ref.weight_dict)
    ref_grads, ref_rng = torch.autograd.grad(ref_total, output_tensors(out)), torch.get_rng_state()
    torch.manual_seed(0)
    loss = DetrLoss(cfg)
    total = loss(out, targets)
    grads = torch.autograd.grad(total, output_tensors(out))
    assert torch.equal(torch.get_rng_state(), ref_rng)               # the same draws: the next ones agree too
    assert sorted(loss.terms) == sorted(ref_terms) and 'loss_mask_dice_enc' in loss.terms
    for k, v in ref_terms.items(): assert max_diff(v.detach(), loss.terms[k]) <= GRAD_TOL * max(1, v.abs().item()), k
    assert max_diff(ref_total, total) <= GRAD_TOL * max(1, ref_total.abs().item())
    for i, (a, b) in enumerate(zip(ref_grads, grads)): assert max_diff(a, b) < GRAD_TOL, i
    if sum(sizes): assert loss.terms['loss_mask_dice'] > 0 and grads[2].abs().sum() > 0   # masks were matched and trained

def test_detection_ignores_masks():
    "A detection model's loss neither reads masks nor draws random numbers, whatever the outputs and targets carry."
    cfg = tiny_config(group_detr=GROUPS)
    targets = with_target_masks(make_targets([3, 1], cfg.num_classes + 1))
    out = random_outputs(cfg, 2, cfg.num_queries * GROUPS)
    plain = DetrLoss(cfg)(out, targets)
    rng = torch.get_rng_state()
    assert DetrLoss(cfg)(with_masks(out, True), targets) == plain and torch.equal(torch.get_rng_state(), rng)
