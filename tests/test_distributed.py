"""Distributed training with fastai's `distrib_ctx`: two CPU processes (gloo) train like one process on the same global batches."""
import os, socket
import torch
import torch.multiprocessing as mp
from rfdetr_nb.config import tiny_config
from rfdetr_nb.data import synthetic_shapes, rfdetr_dls
from rfdetr_nb.learner import rfdetr_learner
from fastai.callback.core import Callback

class TrainLosses(Callback):
    "Record the training loss of every batch."
    order = 100
    def before_fit(self): self.losses = []
    def after_loss(self):
        if self.training: self.losses.append(self.learn.loss.item())

def learner(data, out, bs, order=None):
    "The tiny model on `data` without augmentation or shuffling (`order`: the training images' order)."
    torch.manual_seed(0)
    dls = rfdetr_dls(data, bs=bs, resolution=64, block=16, multi_scale=False, scale_jitter=False, flip_p=0., seed=0, device='cpu')
    dls.train.shuffle = False
    if order: dls.train.get_idxs = lambda: [(i, 0) for i in order]
    return rfdetr_learner(dls, tiny_config(num_classes=3), output_dir=out, mixed_precision=False, cbs=[TrainLosses()])

def summary(learn) -> dict:
    return {'losses': learn.train_losses.losses, 'values': [list(v) for v in learn.recorder.values],
            'preds': {i: d.xyxy for i, d in learn.coco_evaluator.preds.items()}, 'weights': learn.model.state_dict()}

def _worker(rank, world, port, data, out):
    torch.set_num_threads(1)   # as forked DataLoader workers do: never reuse the parent's OpenMP pool
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    learn = learner(data, out / f'rank{rank}', bs=2)
    with learn.no_bar(), learn.distrib_ctx(): learn.fit(1, lr=1e-3)
    torch.save(summary(learn), out / f'rank{rank}.pt')

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def test_two_processes_train_like_one(tmp_path):
    data = synthetic_shapes(tmp_path / 'data', n_train=8, n_valid=4, size=64)
    # forked workers start at once with everything imported; each trains on its half of the 8 images, 2 per batch
    mp.start_processes(_worker, args=(2, free_port(), data, tmp_path), nprocs=2, start_method='fork')
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2)]
    # one process, 4 per batch: fastai's DistributedDL gives rank 0 images 0-3 and rank 1 images 4-7, 2 at a time
    one = learner(data, tmp_path / 'one', bs=4, order=[0, 1, 4, 5, 2, 3, 6, 7])
    with one.no_bar(): one.fit(1, lr=1e-3)
    ref = summary(one)
    assert len(ref['losses']) == 2
    for step, loss in enumerate(ref['losses']):   # DetrLoss normalises by the boxes of both processes: the mean is the loss
        assert abs(sum(r['losses'][step] for r in ranks) / 2 - loss) < 1e-4
    for r in ranks:
        assert abs(r['values'][0][1] - ref['values'][0][1]) < 1e-4                     # validation loss (gathered)
        assert sorted(r['preds']) == [0, 1, 2, 3]                                     # every process scored all 4 images
        for i, xyxy in ref['preds'].items(): assert torch.allclose(torch.as_tensor(r['preds'][i]), torch.as_tensor(xyxy), atol=1e-3)
        for k, v in ref['weights'].items(): torch.testing.assert_close(r['weights'][k].float(), v.float(), atol=1e-5, rtol=0, msg=k)
    assert 'checkpoint_best_total.pth' in {p.name for p in (tmp_path / 'rank0').iterdir()}
    assert not (tmp_path / 'rank1').exists() or not any((tmp_path / 'rank1').iterdir())   # files from the first process only
