"Data loading: parity of the readers and multi-scale sizes with the reference rfdetr, and loader reproducibility across workers."
import json
from contextlib import nullcontext
import numpy as np
import pytest
import torch
from rfdetr_nb.data import load_dataset, multi_scale_sizes, rfdetr_dls, synthetic_shapes, COCO_JSON
from oracle import rfdetr  # noqa: F401  (skips or fails like the other oracle tests when the reference is missing)

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    "A small synthetic dataset in both layouts, the COCO one with crowd, clamped and zero-width boxes added."
    root = tmp_path_factory.mktemp('data')
    coco, yolo = synthetic_shapes(root/'coco', n_train=12, n_valid=6, size=96), synthetic_shapes(root/'yolo', n_train=12, n_valid=6, size=96, layout='yolo')
    f = coco/'train'/COCO_JSON
    c = json.loads(f.read_text())
    c['annotations'][0]['iscrowd'] = 1
    c['annotations'][1]['bbox'] = [-8, 50, 40, 70]
    c['annotations'][2]['bbox'][3] = 0
    f.write_text(json.dumps(c))
    return coco, yolo

@pytest.mark.parametrize('split', ['train', 'valid'])
def test_roboflow_coco_matches_reference(shapes, split):
    "Labels and boxes per image equal those of the reference's CocoDetection with its Roboflow category mapping."
    from rfdetr.datasets.coco import CocoDetection, _train_split_cat2label
    root = shapes[0]
    ref = CocoDetection(root/split, root/split/COCO_JSON, transforms=None, remap_category_ids=True,
                        cat2label=_train_split_cat2label(root) if split != 'train' else None)
    with pytest.warns(UserWarning, match="no width or height") if split == "train" else nullcontext():
        ours = load_dataset(root, split)
    assert len(ref) == len(ours)
    for i, path in enumerate(ours.image_paths):
        _, t = ref[i]
        det = ours.annotations[path]
        np.testing.assert_array_equal(det.class_id, t['labels'].numpy())
        np.testing.assert_allclose(det.xyxy, t['boxes'].numpy(), atol=1e-5)

def test_yolo_matches_reference(shapes):
    "YOLO labels and boxes equal those of the reference's lazy YOLO reader."
    from rfdetr.datasets.yolo import _build_lazy_yolo_detection_dataset
    root = shapes[1]
    ref = _build_lazy_yolo_detection_dataset(str(root/'train'/'images'), str(root/'train'/'labels'), str(root/'data.yaml'))
    ours = load_dataset(root)
    assert len(ref) == len(ours)
    for i, path in enumerate(ours.image_paths):
        ref_path, _, rdet = ref[i]
        assert ref_path == path
        np.testing.assert_array_equal(ours.annotations[path].class_id, rdet.class_id)
        np.testing.assert_allclose(ours.annotations[path].xyxy, rdet.xyxy, atol=1e-3)

@pytest.mark.parametrize('resolution,patch,windows', [(384, 16, 2), (512, 16, 2), (576, 16, 2), (560, 14, 4), (312, 12, 2), (64, 16, 2), (100, 16, 2)])
@pytest.mark.parametrize('expanded', [True, False])
def test_multi_scale_sizes_match_reference(resolution, patch, windows, expanded):
    from rfdetr.datasets.coco import compute_multi_scale_scales
    assert multi_scale_sizes(resolution, patch * windows, expanded) == compute_multi_scale_scales(resolution, expanded, patch, windows)

def test_workers_give_the_same_batches(shapes):
    "A seeded loader gives the same augmented batches with and without worker processes."
    def epoch(nw): return list(rfdetr_dls(shapes[1], bs=4, resolution=64, num_workers=nw, seed=3).train)
    for (x0, y0), (x2, y2) in zip(epoch(0), epoch(2)):
        torch.testing.assert_close(x0, x2)
        for a, b in zip(y0, y2):
            for k in a: torch.testing.assert_close(a[k], b[k])

def test_augmented_targets_stay_valid(shapes):
    "Over many augmented batches every box stays inside the image with positive size, and labels stay in range."
    dls = rfdetr_dls(shapes[1], bs=4, resolution=64, seed=0)
    n_boxes = 0
    for _ in range(5):
        for x, y in dls.train:
            assert x.shape == (4, 3, 224, 224)
            for t in y:
                b = t['boxes']
                assert ((b[:, :2] - b[:, 2:] / 2 >= -1e-6) & (b[:, :2] + b[:, 2:] / 2 <= 1 + 1e-6)).all() and (b[:, 2:] > 0).all()
                assert ((t['labels'] >= 0) & (t['labels'] < 3)).all()
                n_boxes += len(b)
    assert n_boxes > 50
