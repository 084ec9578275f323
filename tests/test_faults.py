"""Training under faults and bad input (issue 20): kills between the history row and the state, two runs in one folder,
divergence, bad resume files, datasets with nothing to learn. Kills are simulated without signals where they can be."""
import json, math, os, shutil, subprocess, sys, time
import pytest
import torch
from rfdetr_nb.config import tiny_config
from rfdetr_nb.data import synthetic_shapes, rfdetr_dls, COCO_JSON
from rfdetr_nb.learner import rfdetr_learner
from rfdetr_nb.training import TrainingDiverged
from rfdetr_nb.runs import LOCK_FILE
import rfdetr_nb.runs as runs_module
from fastai.callback.core import Callback


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return synthetic_shapes(tmp_path_factory.mktemp('data') / 'shapes', n_train=24, n_valid=8, size=64, seed=0)

def dls_of(path, **kwargs): return rfdetr_dls(path, **{'bs': 8, 'resolution': 64, 'block': 16, 'seed': 0, **kwargs})

def learner(path, out, **kwargs):
    "A seeded tiny learner on the dataset `path`, writing to `out`."
    torch.manual_seed(0)
    return rfdetr_learner(dls_of(path), tiny_config(num_classes=3), output_dir=out, mixed_precision=False, **kwargs)

def fit(learn, n=1):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(n)
    return learn

def epochs_in_history(out): return [l.split(',')[0] for l in (out / 'history.csv').read_text().splitlines()[1:]]

@pytest.fixture(scope='module')
def one_epoch(shapes, tmp_path_factory):
    "The folder of a finished one-epoch run (umask 022)."
    out = tmp_path_factory.mktemp('runs') / 'one'
    umask = os.umask(0o022)
    try: fit(learner(shapes, out))
    finally: os.umask(umask)
    return out


def test_kill_between_history_row_and_state(shapes, tmp_path, monkeypatch):
    """Killed while `last.pth` of epoch 1 is written (its history row is already there; a half-written temporary
    file is left): the resume trains epoch 1 again, the history holds each epoch once, the temporary file is gone,
    and the run ends as one that was never stopped."""
    straight = fit(learner(shapes, tmp_path / 'straight'), 2)
    out, real_save, saves = tmp_path / 'killed', runs_module.atomic_save, []
    def dying_save(obj, path):
        if path.name == 'last.pth' and len(saves) == 1:                    # the second epoch's state
            (path.parent / '.last.pth.0badc0de.tmp').write_bytes(b'PK\x03\x04 half a file')
            raise KeyboardInterrupt                                         # a kill: no cleanup runs
        if path.name == 'last.pth': saves.append(path)
        real_save(obj, path)
    monkeypatch.setattr(runs_module, 'atomic_save', dying_save)
    with pytest.raises(KeyboardInterrupt): fit(learner(shapes, out), 2)
    monkeypatch.undo()
    assert epochs_in_history(out) == ['0', '1'] and torch.load(out / 'last.pth', weights_only=True)['epoch'] == 0
    resumed = fit(learner(shapes, out, resume=out / 'last.pth'), 2)
    assert epochs_in_history(out) == ['0', '1']
    assert not list(out.glob('*.tmp')) and not list(out.glob('.*.tmp'))
    for k, v in straight.model.state_dict().items(): torch.testing.assert_close(resumed.model.state_dict()[k], v, atol=1e-6, rtol=0)
    assert list(resumed.recorder.values[-1][:2]) == pytest.approx(list(straight.recorder.values[-1][:2]), rel=1e-6)


def test_one_run_per_folder(shapes, tmp_path):
    "A folder another process trains in is refused before anything is written; killed with -9, its lock is gone."
    out = tmp_path / 'shared'
    out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', f"""import fcntl, time
f = open({str(out / LOCK_FILE)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on elsewhere'); f.flush()
print('held', flush=True); time.sleep(60)"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        learn = learner(shapes, out)
        with pytest.raises(RuntimeError, match='is in use by another training run \\(pid 4242 on elsewhere\\)'): fit(learn)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally: holder.kill(); holder.wait()
    fit(learn)                                                               # kill -9 released the lock
    assert (out / 'last.pth').exists()
    with pytest.warns(UserWarning, match='holds an earlier run'): learner(shapes, out)


def test_nan_loss_stops_the_run(shapes, tmp_path):
    "A loss that turns NaN stops the fit at that step with the likely cause; no checkpoint is written from those weights."
    class Poison(Callback):
        def after_step(self):
            if self.learn.global_step == 2:
                with torch.no_grad(): self.model.class_embed.bias.fill_(math.nan)
    learn = learner(shapes, tmp_path / 'nan', cbs=Poison())
    with pytest.raises(TrainingDiverged, match='at optimiser step 2 \\(epoch 0, batch 2\\).*learning rate too high'): fit(learn)
    assert not list((tmp_path / 'nan').glob('*.pth'))


def test_nan_weights_are_never_saved(shapes, tmp_path):
    "Weights that turn NaN at an epoch's last step (no later loss to notice it) are refused by the checkpoint writer."
    class PoisonLast(Callback):
        def after_step(self):
            if self.iter == self.n_iter - 1:
                with torch.no_grad(): self.model.class_embed.bias.fill_(math.nan)
    with pytest.raises(TrainingDiverged, match='weights of epoch 0 hold NaN'): fit(learner(shapes, tmp_path / 'nan', cbs=PoisonLast()))
    assert not list((tmp_path / 'nan').glob('*.pth'))


def test_bad_numbers_are_refused(shapes, tmp_path):
    "Non-finite numbers and more accumulation steps than batches are refused before anything is built."
    dls = dls_of(shapes)
    for kwargs, msg in [(dict(lr=math.inf), 'lr must be a positive, finite number, got inf'),
                        (dict(lr_encoder=math.nan), 'lr_encoder must be a positive, finite number'),
                        (dict(weight_decay=math.inf), 'weight_decay must be a finite number'),
                        (dict(clip_max_norm=math.nan), 'clip_max_norm must be a finite number'),
                        (dict(grad_accum_steps=100), 'grad_accum_steps=100 is more than the 3 training batches')]:
        with pytest.raises(ValueError, match=msg.replace('(', '\\(')):
            rfdetr_learner(dls, tiny_config(num_classes=3), output_dir=tmp_path / 'x', **kwargs)
    (tmp_path / 'a_file').touch()
    with pytest.raises(NotADirectoryError, match='is a file: choose a folder'):
        rfdetr_learner(dls, tiny_config(num_classes=3), output_dir=tmp_path / 'a_file')


def test_files_follow_the_umask(one_epoch):
    "Checkpoints and the training config get the user's permissions (umask 022: 0644), not mkstemp's 0600."
    files = [p for p in one_epoch.iterdir() if p.name != LOCK_FILE]
    assert len(files) == 6 and {oct(p.stat().st_mode & 0o777) for p in files} == {'0o644'}


def test_resume_files_that_do_not_fit(shapes, one_epoch, tmp_path):
    "A text file, a checkpoint of another class count or another architecture: a clear error before any training."
    (tmp_path / 'notes.pth').write_text('hello, these are my notes\n')
    for model, path, msg in [(tiny_config(num_classes=3), tmp_path / 'notes.pth', 'could not be read as a PyTorch checkpoint'),
                             (tiny_config(num_classes=3, hidden_dim=48), one_epoch / 'last.pth', 'holds another architecture'),
                             (tiny_config(num_classes=3), one_epoch / 'checkpoint_best_total.pth', 'holds no training state')]:
        with pytest.raises(ValueError, match=msg):
            rfdetr_learner(dls_of(shapes), model, output_dir=tmp_path / 'r', resume=path)
    two = tmp_path / 'two'
    shutil.copytree(shapes, two)
    for split in ('train', 'valid'):                                        # circle and square only
        c = json.loads((two / split / COCO_JSON).read_text())
        c['categories'], c['annotations'] = c['categories'][:3], [a for a in c['annotations'] if a['category_id'] < 3]
        (two / split / COCO_JSON).write_text(json.dumps(c))
    with pytest.raises(ValueError, match='was trained on 3 classes but this dataset has 2'):
        rfdetr_learner(dls_of(two), tiny_config(num_classes=3), output_dir=tmp_path / 'r', resume=one_epoch / 'last.pth')


def test_resume_keeps_the_recipe(shapes, one_epoch, tmp_path):
    "A resumed run takes the learning rates it started with, whatever the model object it is given says."
    out = tmp_path / 'again'
    shutil.copytree(one_epoch, out)
    learn = rfdetr_learner(dls_of(shapes), tiny_config(num_classes=3), pretrain_weights=str(out / 'last.pth'), output_dir=out,
                           resume=out / 'last.pth', mixed_precision=False)
    assert (learn.pretrained, learn.lr) == (False, 5e-4)                   # the from-scratch recipe of the first run


def test_validation_without_objects(shapes, tmp_path):
    "A validation split with no objects cannot be scored: a warning, and the best checkpoints follow the validation loss."
    data = tmp_path / 'bgvalid'
    shutil.copytree(shapes, data)
    c = json.loads((data / 'valid' / COCO_JSON).read_text()); c['annotations'] = []
    (data / 'valid' / COCO_JSON).write_text(json.dumps(c))
    with pytest.warns(UserWarning, match='validation split has no objects'): learn = learner(data, tmp_path / 'out')
    fit(learn)
    assert (tmp_path / 'out' / 'checkpoint_best_total.pth').exists()


def test_disk_full_names_the_file(shapes, tmp_path, monkeypatch):
    "A full disk stops the run with a message that says so and names the file; the earlier files stay intact."
    real_save = torch.save
    monkeypatch.setattr(torch, 'save', lambda obj, f: real_save(obj, '/dev/full'))
    with pytest.raises(OSError, match='checkpoint_best_regular.pth: the disk is full'): fit(learner(shapes, tmp_path / 'full'))
    assert sorted(p.name for p in (tmp_path / 'full').iterdir()) == [LOCK_FILE, 'history.csv', 'training_config.json']
