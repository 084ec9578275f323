"""Parity of `rfdetr_nb.loss.DetrLoss` with the reference rfdetr==1.11.2 matcher + SetCriterion (IA-BCE, query groups)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import oracle  # noqa: F401  (the reference rfdetr: skipped without it, a failure in CI)
from rfdetr.models.matcher import HungarianMatcher
from rfdetr.models.criterion import SetCriterion
from rfdetr_nb.config import tiny_config
from rfdetr_nb.loss import DetrLoss
from rfdetr_nb.model import LWDETR

GROUPS, TOL, GRAD_TOL = 13, 1e-4, 1e-5

def reference_criterion(num_slots, dec_layers, train):
    "The reference criterion as its trainer builds it by default (IA-BCE, 13 groups, aux and encoder terms)."
    weights = {'loss_ce': 1.0, 'loss_bbox': 5.0, 'loss_giou': 2.0}
    for suffix in [f'_{i}' for i in range(dec_layers - 1)] + ['_enc']:
        weights.update({k + suffix: w for k, w in list(weights.items())[:3]})
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25)
    return SetCriterion(num_slots, matcher=matcher, weight_dict=weights, focal_alpha=0.25,
                        losses=['labels', 'boxes', 'cardinality'], group_detr=GROUPS, ia_bce_loss=True).train(train)

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

def random_outputs(cfg, batch, enc_rows):
    "Random training outputs with spread-out logits; the encoder has fewer rows per group (few memory tokens)."
    g = torch.Generator().manual_seed(1)
    def layer(rows):
        return {'pred_logits': (torch.randn(batch, rows, cfg.num_classes + 1, generator=g) * 3 - 2).requires_grad_(),
                'pred_boxes': torch.cat([torch.rand(batch, rows, 2, generator=g),
                                         torch.rand(batch, rows, 2, generator=g) * .5 + .02], -1).requires_grad_()}
    rows = cfg.num_queries * GROUPS
    return {**layer(rows), 'aux_outputs': [layer(rows) for _ in range(cfg.dec_layers - 1)], 'enc_outputs': layer(enc_rows)}

def output_tensors(out):
    "Every logits and boxes tensor of every supervised layer."
    layers = [out] + out['aux_outputs'] + [out['enc_outputs']]
    return [t for o in layers for t in (o['pred_logits'], o['pred_boxes'])]

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
