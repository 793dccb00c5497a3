"""The engine's promises, each guarded by a test that fails when the promise breaks (each was watched failing
with the breakage named in its docstring, made in a scratch copy):

- the trainer learns (breakage: the loss's sign flipped, so training ascends);
- the evaluator scores right against known answers (breakages: every mask scored 1.0; `max` instead of `mean`);
- the ML backend's mask for a click is the model's answer and covers the clicked object (breakage: the backend
  returns empty masks);
- NMS keeps the highest-scored box of each overlapping group (breakage: it keeps the lowest-scored).
"""
from __future__ import annotations

import base64
import copy
import json
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from engine.integrations.labelstudio import keypoint_context
from engine.integrations.ml_backend import (BASIC_USER, BackendState, EmbeddingCache, MaskPredictor, MLBackend,
                                            source_image_loader)
from model.amg_filters import nms
from model.clicks import first_click
from model.evaluate import click_eval
from model.segmenter import Prediction, Segmenter
from model.train import TrainSettings, dataset_sampler, train
from storage.brush_rle import decode_mask
from storage.images import ImageSource

torch.set_num_threads(1)


# --------------------------------------------------------------------------- the trainer learns

def test_training_lowers_the_loss_and_raises_one_click_iou_on_the_scenes_it_saw(fitted_compact):
    """120 steps on four fixed scenes (the session fixture) against the same model untrained: the loss on the
    same batch falls and the scenes' 1-click mIoU rises. Breakage: `_step_loss` returning -loss."""
    fitted, scenes = fitted_compact
    fresh = Segmenter.new("compact", seed=0)  # the fixture's starting point
    images, gts = [s[0] for s in scenes], [s[1] for s in scenes]
    data = dataset_sampler(images, gts)
    frozen = TrainSettings(max_steps=1, lr=0.0, batch_images=4, masks_per_image=4, crop_share=0.0, ema_decay=None)
    # lr 0: the loss of the same batch; a copy, as a training step moves BatchNorm statistics of the shared fixture
    loss_after = train(copy.deepcopy(fitted), data, frozen).final_loss
    miou_before = click_eval(fresh, images, gts, clicks=1)["oracle@1"]
    loss_before = train(fresh, data, frozen).final_loss
    miou_after = click_eval(fitted, images, gts, clicks=1)["oracle@1"]
    assert loss_after < 0.8 * loss_before
    assert miou_after > miou_before + 0.15, (miou_before, miou_after)


# --------------------------------------------------------------------------- the evaluator scores right

@dataclass
class _Emb:
    index: int
    original_size: tuple[int, int]


class AnswerSegmenter:
    """A segmenter whose answer to a prompt is a known mask: the ground-truth object under the first
    positive click (or inside the box), shifted right by `shift` pixels. The evaluator must score it
    at exactly the IoU that shift gives."""

    def __init__(self, gts: list[np.ndarray], shift: int = 0):
        self.gts, self.shift = gts, shift
        self.images: list[np.ndarray] = []

    def embed(self, images):
        out = []
        for im in images:
            self.images.append(im)
            out.append(_Emb(len(self.images) - 1, im.shape[:2]))
        return out

    def _object(self, gt: np.ndarray, point=None, box=None) -> np.ndarray:
        if box is not None:
            x0, y0, x1, y1 = (int(v) for v in box)
            k = int(np.argmax([m[y0:y1, x0:x1].sum() for m in gt]))
        else:
            x, y = (int(round(v)) for v in point)
            k = int(np.argmax([m[y, x] for m in gt]))
        return np.roll(gt[k], self.shift, axis=1)

    def predict(self, emb, points=None, labels=None, boxes=None, mask_input=None, multimask=True, upsample=True):
        gt = self.gts[emb.index]
        n = len(points) if points is not None else len(boxes)
        masks = np.stack([self._object(gt, points[i][0] if points is not None else None,
                                       boxes[i] if boxes is not None else None) for i in range(n)])
        m = 3 if multimask else 1
        masks = np.repeat(masks[:, None], m, axis=1)
        return Prediction(torch.from_numpy(masks), torch.ones(n, m), torch.zeros(n, m, 256, 256))


def _rectangles() -> tuple[np.ndarray, np.ndarray, list[float]]:
    """An image with three rectangles of widths 10, 20, 40 px and their IoU when shifted right by 2 px."""
    image = np.zeros((64, 96, 3), np.uint8)
    gt = np.zeros((3, 64, 96), bool)
    for k, (y0, x0, w) in enumerate([(4, 4, 10), (24, 20, 20), (44, 40, 40)]):
        gt[k, y0:y0 + 12, x0:x0 + w] = True
    shifted = [(w - 2) / (w + 2) for w in (10, 20, 40)]
    return image, gt, shifted


def test_evaluator_gives_ground_truth_1_and_a_known_shift_its_known_iou():
    """Breakages: every mask scored 1.0 (the shifted case fails); `max` instead of `mean` (the mean of the
    three known IoUs, 0.778, is not their max, 0.905)."""
    image, gt, shifted = _rectangles()
    exact = click_eval(AnswerSegmenter([gt]), [image], [gt], clicks=3)
    assert {k: exact[k] for k in ("oracle@1", "pred@1", "clicks@3", "box")} == {
        "oracle@1": 1.0, "pred@1": 1.0, "clicks@3": 1.0, "box": 1.0}
    off = click_eval(AnswerSegmenter([gt], shift=2), [image], [gt], clicks=1)
    assert off["oracle@1"] == pytest.approx(np.mean(shifted), abs=1e-9)
    assert off["box"] == pytest.approx(np.mean(shifted), abs=1e-9)
    assert off["n_masks"] == 3


# --------------------------------------------------------------------------- the backend answers with the model

def test_backend_mask_for_a_click_is_the_models_answer_and_covers_the_object(fitted_compact, tmp_path):
    """Through the real HTTP backend: the brush mask for a click equals `Segmenter.predict`'s best mask for
    the same point, and it overlaps the object clicked. Breakage: the backend returning empty masks."""
    seg, scenes = fitted_compact
    image, gt, _ = scenes[0]
    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "scene.png")
    source = ImageSource(str(tmp_path / "images"))
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), "promise-token", None)
    state.image_loader = source_image_loader(source, state=state)
    h, w = image.shape[:2]
    auth = "Basic " + base64.b64encode(f"{BASIC_USER}:promise-token".encode()).decode()
    emb = seg.embed([image])[0]
    overlaps = []
    with MLBackend(state) as backend:
        for k in range(len(gt)):
            x, y = first_click(gt[k])
            body = {"tasks": [{"id": 1, "data": {"image_id": "scene.png", "image": "", "height": h, "width": w}}],
                    "params": {"context": keypoint_context([(x, y)], [1], h, w)}}
            req = urllib.request.Request(backend.url + "/predict", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "Authorization": auth})
            with urllib.request.urlopen(req, timeout=60) as r:
                region = json.loads(r.read())["results"][0]["result"][0]
            got = decode_mask(region["value"]["rle"], h, w)
            p = seg.predict(emb, np.array([[[x, y]]], float), np.ones((1, 1)))
            want = p.masks[0, int(p.iou_pred[0].argmax())].numpy()
            assert np.array_equal(got, want), f"object {k}: the backend's mask is not the model's answer"
            overlaps.append((got & gt[k]).sum() / max(1, gt[k].sum()))
    assert np.mean(overlaps) > 0.5  # the masks cover the objects clicked (a fitted model)


# --------------------------------------------------------------------------- NMS keeps the best box

def _reference_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    """Textbook greedy NMS: take the highest-scored box left, drop every box overlapping it by IoU > thresh."""
    def iou(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    left = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep = []
    while left:
        best = left.pop(0)
        keep.append(best)
        left = [i for i in left if iou(boxes[best], boxes[i]) <= thresh]
    return keep


def test_nms_keeps_the_highest_scored_box_of_each_group():
    """Clusters of jittered boxes with distinct random scores (a real score order, no ties). Breakage: NMS
    visiting boxes by ascending score (keeping the worst of each group)."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(50, 950, size=(40, 2))
    boxes = []
    for cx, cy in centres:
        for _ in range(5):
            w, h = rng.uniform(30, 80, 2)
            jx, jy = rng.normal(0, 4, 2)
            boxes.append([cx + jx - w / 2, cy + jy - h / 2, cx + jx + w / 2, cy + jy + h / 2])
    boxes = np.asarray(boxes, np.float32)
    scores = rng.permutation(len(boxes)).astype(np.float32) / len(boxes)
    for thresh in (0.3, 0.5, 0.7):
        got = nms(boxes, scores, thresh).tolist()
        assert got == _reference_nms(boxes, scores, thresh)
    # within the tightest cluster the kept box is that cluster's best
    first = nms(boxes[:5], scores[:5], 0.1).tolist()
    assert first[0] == int(np.argmax(scores[:5]))
