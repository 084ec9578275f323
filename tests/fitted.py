"""A tiny detector fitted to one synthetic scene, shared by the TFLite and OpenVINO tests.

Why a fitted model: with random weights the encoder's proposal scores are near ties, so int8's (or bfloat16's)
rounding picks other proposals and no detection is stable (see the export notebook). Fitted for 300 steps to two
shapes, the model's detections are confident and far apart in score from the rest, so a faithful file must keep them."""
import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_convert, box_iou
from rfdetr_nb.api import tiny_detector, images_to_batch
from rfdetr_nb.loss import DetrLoss

SIZE = 64
OBJECTS = [('rectangle', (6, 8, 30, 36), (230, 40, 40)), ('ellipse', (36, 30, 60, 58), (40, 60, 230))]  # class = index

def scene() -> np.ndarray:
    "A grey 64×64 RGB image with a red rectangle (class 0) and a blue ellipse (class 1)."
    img = Image.new('RGB', (SIZE, SIZE), (90, 90, 90))
    for shape, box, colour in OBJECTS: getattr(ImageDraw.Draw(img), shape)(box, fill=colour)
    return np.asarray(img)

def fitted_detector():
    "The tiny detector after 300 AdamW steps on the scene (deterministic: fixed seed, one image)."
    torch.manual_seed(0)
    rf = tiny_detector(resolution=SIZE)
    net = rf.model.model.train()
    _, x, _ = images_to_batch([scene()], (SIZE, SIZE))
    xyxy = torch.tensor([box for _, box, _ in OBJECTS], dtype=torch.float32) / SIZE
    target = [{'boxes': box_convert(xyxy, 'xyxy', 'cxcywh'), 'labels': torch.arange(len(OBJECTS))}]
    loss, opt = DetrLoss(net.cfg), torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(300):
        opt.zero_grad(); loss(net(x), target).backward(); opt.step()
    net.eval()
    return rf, x.numpy()

def noisy_scenes(n:int=8, seed:int=0) -> np.ndarray:
    "`n` copies of the scene with Gaussian noise, `N×H×W×3` floats in [0, 1]: int8 calibration data."
    rng = np.random.default_rng(seed)
    return np.clip(scene()[None] / 255 + rng.normal(0, .05, (n, SIZE, SIZE, 3)), 0, 1).astype(np.float32)

def scores(labels): return 1 / (1 + np.exp(-labels))

def detections(out, threshold):
    "Per query: xyxy box, best score and class, for the queries of image 0 whose score reaches `threshold`."
    s = scores(out['labels'][0])
    keep = s.max(-1) >= threshold
    return box_convert(torch.from_numpy(out['dets'][0][keep]), 'cxcywh', 'xyxy'), s.max(-1)[keep], s.argmax(-1)[keep]

def keeps_detections(want, got, threshold:float=0.5, loose:float=0.25) -> bool:
    "Whether every detection of `want` (score ≥ `threshold`) is in `got` (score ≥ `loose`), same class, IoU ≥ 0.5."
    boxes, _, cls = detections(want, threshold)
    q_boxes, _, q_cls = detections(got, loose)
    iou = box_iou(boxes, q_boxes).numpy() * (cls[:, None] == q_cls[None])  # same class only
    return len(boxes) >= 1 and bool((iou.max(1, initial=0) >= 0.5).all())

SEG_SHAPE = (64, 96)   # not square, and Q=10, h/4=16, w/4=24 all differ: a channels-last `masks` could not pass for [B,Q,h,w]

def seg_detector():
    "A random-weight tiny segmentation model (3 classes, 10 queries) for the export tests: masks need no training to be compared."
    torch.manual_seed(0)
    return tiny_detector(num_classes=3, segmentation_head=True)

def seg_calibration() -> np.ndarray:
    "Four random images at the export shape, `N×H×W×3` floats in [0, 1]: int8 calibration data for the seg model."
    return np.random.default_rng(0).random((4, *SEG_SHAPE, 3), dtype=np.float32)

def seg_input() -> np.ndarray:
    "One random network input `[1,3,H,W]` at the export shape."
    return np.random.default_rng(2).standard_normal((1, 3, *SEG_SHAPE), dtype=np.float32)

def seg_images() -> list[np.ndarray]:
    "Two random RGB images of other sizes than the export shape (masks come back at the images' own sizes)."
    rng = np.random.default_rng(0)
    return [(rng.random((120, 200, 3)) * 255).astype(np.uint8), (rng.random((90, 70, 3)) * 255).astype(np.uint8)]

def mask_ious(a:np.ndarray, b:np.ndarray) -> np.ndarray:
    "IoU of each pair of boolean masks `[K,h,w]` (1 where both are empty)."
    inter, union = (a & b).sum((1, 2)), (a | b).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)

def assert_same_segments(got, want, iou:float=0.99, conf_atol:float=1e-4):
    "Exported predictions `got` against `RFDETR.predict`'s `want` (lists of `sv.Detections`): same classes and scores, masks of IoU ≥ `iou`."
    for g, w in zip(got, want):
        assert len(g) == len(w) > 0 and g.mask is not None and g.mask.shape == w.mask.shape and g.mask.dtype == bool
        np.testing.assert_array_equal(g.class_id, w.class_id)
        np.testing.assert_allclose(g.confidence, w.confidence, atol=conf_atol)
        assert mask_ious(g.mask, w.mask).min() >= iou, mask_ious(g.mask, w.mask)
