"""`rfdetr_nb.metrics`: the same numbers as pycocotools used directly, the id-0 pitfall on a Roboflow export, and
`evaluate` / `RFDETR.evaluate` plumbing on a tiny random model."""
import contextlib, io, json
import numpy as np
import pytest
import supervision as sv
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from pycocotools import mask as mask_utils
from rfdetr_nb.api import tiny_detector
from rfdetr_nb.data import load_dataset, synthetic_shapes
from rfdetr_nb.metrics import coco_eval, evaluate, per_class_table, rle, confusion_matrix

KEYS = ('map', 'map50', 'map75', 'map_small', 'map_medium', 'map_large', None, None, 'mar_100')  # COCOeval.stats order


def random_case(seed, n_images=15, classes=('a', 'b', 'c', 'd')):
    "Random ground truth (class 'd' without boxes, background images) and scored predictions near and far from it."
    rng = np.random.default_rng(seed)
    def boxes(n):
        xy = rng.uniform(0, 500, (n, 2))
        return np.concatenate([xy, xy + rng.uniform(2, 250, (n, 2))], 1)   # small, medium and large boxes
    paths, anns, preds = [f'im{i}.jpg' for i in range(n_images)], {}, []
    for i, p in enumerate(paths):
        n = 0 if i % 5 == 0 else int(rng.integers(1, 8))
        gt = boxes(n)
        anns[p] = sv.Detections(xyxy=gt, class_id=rng.integers(0, len(classes) - 1, n))
        m = 0 if i % 7 == 3 else int(rng.integers(0, 30))   # some images without predictions
        cls = np.concatenate([np.where(rng.random(n) < .8, anns[p].class_id, rng.integers(0, len(classes), n)),
                              rng.integers(0, len(classes) + 1, m)])  # len(classes): the head's extra slot
        preds.append(sv.Detections(xyxy=np.concatenate([gt + rng.normal(0, 6, gt.shape), boxes(m)]), class_id=cls,
                                   confidence=rng.random(n + m).round(2)))   # rounded: ties in the ranking too
    return sv.DetectionDataset(list(classes), paths, anns), preds


def direct_cocoeval(ds, preds, tmp_path, cat_ids=None, iou_type='bbox'):
    "pycocotools the documented way: a ground-truth JSON file (ids from 1), `loadRes` on a results list (boxes or RLE masks)."
    segm = iou_type == 'segm'
    def obj(i, xyxy, c, m):
        x0, y0, x1, y1 = xyxy
        return {'image_id': i, 'category_id': c, **({'segmentation': rle(m)} if segm else {'bbox': [x0, y0, x1 - x0, y1 - y0]})}
    masks = lambda d: d.mask if segm else [None] * len(d)
    gt = {'images': [{'id': i, 'file_name': p, 'height': SIZE, 'width': SIZE} for i, p in enumerate(ds.image_paths)],
          'categories': [{'id': i, 'name': n} for i, n in enumerate(ds.classes)], 'annotations': []}
    for i, p in enumerate(ds.image_paths):
        d = ds.annotations[p]
        for o in zip(d.xyxy.tolist(), d.class_id.tolist(), masks(d)):
            a = obj(i, *o) | {'id': len(gt['annotations']) + 1, 'iscrowd': 0}
            a['area'] = float(mask_utils.area(a['segmentation'])) if segm else a['bbox'][2] * a['bbox'][3]
            gt['annotations'].append(a)
    (tmp_path / 'gt.json').write_text(json.dumps(gt))
    res = [obj(i, *o) | {'score': s} for i, d in enumerate(preds)
           for o, s in zip(zip(d.xyxy.tolist(), d.class_id.tolist(), masks(d)), d.confidence.tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / 'gt.json'))
        e = COCOeval(coco, coco.loadRes(res), iou_type)
        if cat_ids is not None: e.params.catIds = cat_ids
        e.evaluate(); e.accumulate(); e.summarize()
    return e.stats


SIZE = 760   # the random boxes lie inside a SIZE×SIZE image

def add_blobs(det:sv.Detections, rng) -> sv.Detections:
    "Give each box a mask its box does not tell: an ellipse of random size around a random point inside it."
    yy, xx = np.mgrid[:SIZE, :SIZE] + .5
    lo, hi = det.xyxy[:, :2], det.xyxy[:, 2:]
    c = lo + (hi - lo) * rng.uniform(.3, .7, lo.shape)
    r = np.maximum((hi - lo) * rng.uniform(.2, .6, lo.shape), 1)
    det.mask = ((xx - c[:, None, None, 0]) / r[:, None, None, 0]) ** 2 + ((yy - c[:, None, None, 1]) / r[:, None, None, 1]) ** 2 <= 1
    return det


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_equals_pycocotools(seed, tmp_path):
    ds, preds = random_case(seed)
    ours, expected = coco_eval(ds, preds), direct_cocoeval(ds, preds, tmp_path)
    for k, v in zip(KEYS, expected):
        if k: np.testing.assert_allclose(ours[k], np.nan if v < 0 else v, rtol=0, atol=1e-12, err_msg=k)
    assert 0 < ours['map'] < 1
    assert set(ours['per_class']) == {'a', 'b', 'c'}   # 'd' has no ground truth
    table = per_class_table(ours)
    assert list(table.index) == ['a', 'b', 'c']
    for k, name in enumerate(table.index):   # each class alone, through pycocotools: AP, AP50, AP75
        stats = direct_cocoeval(ds, preds, tmp_path, cat_ids=[k])
        np.testing.assert_allclose([ours['per_class'][name], *table.loc[name, ['AP', 'AP50', 'AP75']]],
                                   [stats[0], stats[0], stats[1], stats[2]], atol=1e-12)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_masks_equal_pycocotools(seed, tmp_path):
    "Mask AP (iou_type='segm'), overall and per class, equals pycocotools' segm evaluation of RLE files."
    ds, preds = random_case(seed)
    rng = np.random.default_rng(seed)
    for p in ds.image_paths: add_blobs(ds.annotations[p], rng)
    preds = [add_blobs(d, rng) for d in preds]
    ours, expected = coco_eval(ds, preds, 'segm'), direct_cocoeval(ds, preds, tmp_path, iou_type='segm')
    for k, v in zip(KEYS, expected):
        if k: np.testing.assert_allclose(ours[k], np.nan if v < 0 else v, rtol=0, atol=1e-12, err_msg=k)
    assert 0 < ours['map'] < coco_eval(ds, preds)['map']   # the shapes are harder to get right than their boxes
    table = per_class_table(ours)
    for k, name in enumerate(table.index):
        stats = direct_cocoeval(ds, preds, tmp_path, cat_ids=[k], iou_type='segm')
        np.testing.assert_allclose([ours['per_class'][name], *table.loc[name, ['AP', 'AP50', 'AP75']]],
                                   [stats[0], stats[0], stats[1], stats[2]], atol=1e-12)
    both = coco_eval(ds, preds, ('bbox', 'segm'))
    assert both['mask_map'] == ours['map'] and both['map'] == coco_eval(ds, preds)['map']
    cm = confusion_matrix(both.segm, conf_threshold=0.5)   # matched by mask IoU: fewer true positives than by box
    assert np.trace(cm.matrix) < np.trace(confusion_matrix(both, conf_threshold=0.5).matrix)


def test_first_annotation_counts(tmp_path):
    "A Roboflow export numbers annotations from 0; pycocotools alone never matches id 0, coco_eval renumbers."
    split = tmp_path / 'ds' / 'valid'
    split.mkdir(parents=True)
    for name in ('a.jpg', 'b.jpg'): Image.new('RGB', (100, 80)).save(split / name)
    coco = {'images': [{'id': 0, 'file_name': 'a.jpg', 'width': 100, 'height': 80},
                       {'id': 1, 'file_name': 'b.jpg', 'width': 100, 'height': 80}],
            'categories': [{'id': 0, 'name': 'shapes', 'supercategory': 'none'},
                           {'id': 1, 'name': 'dot', 'supercategory': 'shapes'}],
            'annotations': [{'id': 0, 'image_id': 0, 'category_id': 1, 'bbox': [10, 10, 30, 20], 'area': 600, 'iscrowd': 0},
                            {'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [50, 40, 20, 20], 'area': 400, 'iscrowd': 0}]}
    for s in ('train', 'valid'):
        (tmp_path / 'ds' / s).mkdir(exist_ok=True)
        (tmp_path / 'ds' / s / '_annotations.coco.json').write_text(json.dumps(coco))
    for name in ('a.jpg', 'b.jpg'): Image.new('RGB', (100, 80)).save(tmp_path / 'ds' / 'train' / name)
    ds = load_dataset(tmp_path / 'ds', 'valid')
    assert ds.classes == ['dot']
    first_only = [sv.Detections(xyxy=np.array([[10., 10, 40, 30]]), class_id=np.array([0]), confidence=np.array([.9])),
                  sv.Detections.empty()]
    np.testing.assert_allclose(coco_eval(ds, first_only)['map50'], 51 / 101)   # the first box found: half the recall
    with contextlib.redirect_stdout(io.StringIO()):   # the same through pycocotools with the file's own ids
        gt = COCO(str(split / '_annotations.coco.json'))
        e = COCOeval(gt, gt.loadRes([{'image_id': 0, 'category_id': 1, 'bbox': [10, 10, 30, 20], 'score': .9}]), 'bbox')
        e.params.catIds = [1]
        e.evaluate(); e.accumulate(); e.summarize()
    assert e.stats[1] == 0   # the match with annotation id 0 is lost


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return synthetic_shapes(tmp_path_factory.mktemp('shapes') / 'ds', n_train=2, n_valid=7, size=96, seed=3)


def test_evaluate_a_tiny_model(shapes):
    ds = load_dataset(shapes, 'valid')
    torch.manual_seed(0)
    rf = tiny_detector(num_classes=len(ds.classes))
    rf.model.class_names = list(ds.classes)
    seen = []
    def predict(images, threshold=0.5):
        seen.extend(im.copy() for im in images)
        assert threshold == 0.0 and len(images) <= 3
        return rf.predict(images, threshold=threshold, include_source_image=False)
    res = evaluate(predict, ds, batch_size=3, progress=True)
    assert set(res) == {'map', 'map50', 'map75', 'map_small', 'map_medium', 'map_large', 'mar_100', 'per_class'}
    assert len(seen) == len(res.predictions) == len(ds)
    for im, p in zip(seen, ds.image_paths):   # every image once, in order, as RGB
        np.testing.assert_array_equal(im, np.asarray(Image.open(p).convert('RGB')))
    assert {len(d) for d in res.predictions} == {rf.model_config.num_select}
    assert 0 <= res['map'] <= 1
    via_model = rf.evaluate(shapes, split='valid', batch_size=2, progress=False)
    for k in ('map', 'map50', 'mar_100'): np.testing.assert_allclose(via_model[k], res[k], atol=1e-6)   # any batch size
    for a, b in zip(via_model.predictions, res.predictions): np.testing.assert_allclose(a.xyxy, b.xyxy, atol=1e-4)
