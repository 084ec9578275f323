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

# ---- masks (issue 19)
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert
import supervision as sv

SQUARE, TRI = [2, 2, 12, 2, 12, 10, 2, 10], [20, 5, 28, 5, 24, 15]

def one_image_coco(root, segmentations, w=30, h=20):
    "A Roboflow COCO export with one `w`×`h` train image and one annotation per segmentation."
    (root/'train').mkdir(parents=True)
    Image.new('RGB', (w, h)).save(root/'train'/'a.jpg')
    anns = [{'id': i, 'image_id': 0, 'category_id': 1, 'bbox': [0, 0, 5, 5], 'area': 25, 'iscrowd': 0, 'segmentation': s}
            for i, s in enumerate(segmentations)]
    coco = {'images': [{'id': 0, 'file_name': 'a.jpg', 'width': w, 'height': h}], 'annotations': anns,
            'categories': [{'id': 0, 'name': 'things', 'supercategory': 'none'}, {'id': 1, 'name': 'thing', 'supercategory': 'things'}]}
    (root/'train'/COCO_JSON).write_text(json.dumps(coco))
    return root

def rle_of(m, compressed=True):
    "The COCO RLE of the bool mask `m`: compressed (counts a string, as JSON holds it) or uncompressed (a list of runs)."
    if compressed:
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {'size': list(m.shape), 'counts': r['counts'].decode()}
    flat = m.T.ravel()                                                            # column-major runs, zeros first
    runs = np.diff(np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1, flat.size])
    return {'size': list(m.shape), 'counts': ([0] if flat[0] else []) + runs.tolist()}

def test_coco_masks_every_format_match_reference(tmp_path):
    "Polygons (two parts OR-ed), compressed and uncompressed RLE give the masks the reference's CocoDetection gives."
    from rfdetr.datasets.coco import CocoDetection
    blob = np.zeros((20, 30), bool); blob[3:9, 14:25] = True; blob[12:18, 1:4] = True
    root = one_image_coco(tmp_path/'d', [[SQUARE, TRI], rle_of(blob), rle_of(blob, compressed=False), [TRI]])
    det = load_dataset(root, masks=True)[0][2]
    assert det.mask.dtype == bool and det.mask.shape == (4, 20, 30)
    np.testing.assert_array_equal(det.mask[0], det.mask[0] | det.mask[3])          # the triangle part is OR-ed in
    assert det.mask[0, 2:10, 2:12].all() and det.mask[0].sum() > 80
    np.testing.assert_array_equal(det.mask[1], blob); np.testing.assert_array_equal(det.mask[2], blob)
    _, t = CocoDetection(root/'train', root/'train'/COCO_JSON, transforms=None, include_masks=True, remap_category_ids=True)[0]
    np.testing.assert_array_equal(det.mask, t['masks'].numpy().astype(bool))
    assert load_dataset(root)[0][2].mask is None                                  # detection datasets unchanged

def test_yolo_seg_lines_match_reference(tmp_path):
    "A YOLO-seg polygon and a 5-number box line (a rectangle mask) read as the reference reads them (its rasteriser is PIL's)."
    from rfdetr.datasets.yolo import _build_lazy_yolo_segmentation_dataset
    root = tmp_path/'y'
    for d in ('train/images', 'train/labels'): (root/d).mkdir(parents=True)
    Image.new('RGB', (40, 20)).save(root/'train/images/a.jpg')
    (root/'train/labels/a.txt').write_text('0 0.1 0.1 0.5 0.1 0.3 0.9\n1 0.75 0.5 0.3 0.6\n')
    (root/'data.yaml').write_text('names: [a, b]\ntrain: train/images\n')
    det = load_dataset(root, masks=True)[0][2]
    np.testing.assert_array_equal(det.class_id, [0, 1])
    np.testing.assert_array_equal(np.nonzero(det.mask[1].any(0))[0], np.arange(24, 36))   # x 0.6..0.9 of 40 px
    np.testing.assert_array_equal(np.nonzero(det.mask[1].any(1))[0], np.arange(4, 16))    # y 0.2..0.8 of 20 px
    ref = _build_lazy_yolo_segmentation_dataset(str(root/'train/images'), str(root/'train/labels'), str(root/'data.yaml'))[0][2]
    np.testing.assert_allclose(det.xyxy, ref.xyxy, atol=1e-4)
    for ours, theirs in zip(det.mask, ref.mask):                                  # rasterisers differ on edge pixels only
        assert (ours & theirs).sum() / (ours | theirs).sum() > 0.75 and (ours & ~theirs).sum() <= 4

@pytest.mark.parametrize('seg,message', [
    ([[1, 1, 9, 1]], 'annotation 0: a polygon needs at least 3 points'),
    ([[1, 1, 9, 1, 9, 9, 4]], 'annotation 0: a polygon needs at least 3 points as x, y numbers (an even count, at least 6), got 7'),
    ({'size': [21, 30], 'counts': 'PP5'}, 'annotation 0: the RLE is for a [21, 30] image'),
    ({'size': [20, 30], 'counts': [5, 5]}, 'annotation 0: the RLE counts add up to 10 pixels'),
    ([], "annotation 0 has no 'segmentation' and masks were asked for"),
])
def test_bad_coco_masks_name_file_and_annotation(tmp_path, seg, message):
    root = one_image_coco(tmp_path/'d', [seg])
    with pytest.raises(ValueError, match=f'{COCO_JSON}: ') as e: load_dataset(root, masks=True)
    assert message in str(e.value)
    assert len(load_dataset(root)[0][2]) == 1                                     # without masks the outline is not read

@pytest.mark.parametrize('line,message', [('0 .1 .1 .5 .1 .3 nine\n', 'a.txt:1: expected numbers'), ('0 .1 .1 .5 .1 .3\n', 'a.txt:1: expected 5 values'),
                                          ('0 .1 .1 .5 .1 .3 .9 .4\n', 'got 8')])
def test_bad_yolo_seg_lines(tmp_path, line, message):
    root = tmp_path/'y'
    for d in ('train/images', 'train/labels'): (root/d).mkdir(parents=True)
    Image.new('RGB', (40, 20)).save(root/'train/images/a.jpg')
    (root/'train/labels/a.txt').write_text(line)
    (root/'data.yaml').write_text('names: [a, b]\n')
    with pytest.raises(ValueError, match=message): load_dataset(root, masks=True)

@pytest.mark.parametrize('layout', ['coco', 'yolo'])
def test_synthetic_masks_round_trip(tmp_path, layout):
    "synthetic_shapes(masks=True) reads back to the painted masks, with boxes their extents; without masks: no mask."
    from rfdetr_nb.data import shapes_image
    root = synthetic_shapes(tmp_path/layout, n_train=8, n_valid=2, size=80, masks=True, layout=layout)
    ds = load_dataset(root, masks=True)
    for i, (_, _, det) in enumerate(ds):
        _, boxes, labels, painted = shapes_image(np.random.default_rng([0, 0, i]), 80)
        np.testing.assert_array_equal(det.mask, painted); np.testing.assert_array_equal(det.class_id, labels)
        np.testing.assert_allclose(det.xyxy, boxes, atol=0.26)
    assert all(d.mask is None for _, _, d in load_dataset(root))

def test_dls_masks_follow_boxes(tmp_path):
    "Over augmented batches (crops, flips, resizes) each target mask is bool at the image size and its extent is its box."
    root = synthetic_shapes(tmp_path/'s', n_train=8, n_valid=4, size=96, masks=True, layout='yolo')
    dls = rfdetr_dls(root, bs=4, resolution=64, seed=1, masks=True)
    n = 0
    for _ in range(3):
        for x, y in list(dls.train) + list(dls.valid):
            for img, t in zip(x, y):
                m = t['masks']
                assert m.dtype == torch.bool and m.shape == (len(t['boxes']), *img.shape[-2:])
                seen = m.flatten(1).any(1)
                got = torch.from_numpy(sv.mask_to_xyxy(m[seen].numpy())).float() + torch.tensor([0., 0, 1, 1])
                torch.testing.assert_close(box_convert(t['boxes'][seen], 'cxcywh', 'xyxy') * img.shape[-1], got, atol=2, rtol=0)
                n += int(seen.sum())
    assert n > 30
    assert 'masks' not in rfdetr_dls(root, bs=4, resolution=64).one_batch()[1][0]

def test_workers_give_the_same_mask_batches(tmp_path):
    "Masks travel through worker processes unchanged: a seeded loader gives the same masks with and without workers."
    root = synthetic_shapes(tmp_path/'s', n_train=8, n_valid=4, size=64, masks=True)
    def epoch(nw): return list(rfdetr_dls(root, bs=4, resolution=64, num_workers=nw, seed=3, masks=True).train)
    for (x0, y0), (x2, y2) in zip(epoch(0), epoch(2)):
        torch.testing.assert_close(x0, x2)
        for a, b in zip(y0, y2): assert torch.equal(a['masks'], b['masks'])
