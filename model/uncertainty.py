"""How unsure the model is about an image: the score that picks the next round's images (active learning).

An image the current model already segments confidently teaches the next retraining little; one where it
hesitates is worth an annotator's time. Per image, a coarse grid of point prompts is decoded with three
(multimask) outputs each, and three signals of doubt are averaged over the points:
  - instability: 1 - the stability score of the best output (its area moves when the threshold moves);
  - low confidence: 1 - the highest predicted IoU of the point's outputs;
  - disagreement: 1 - the mean IoU between the three outputs' masks.
The score is the instability alone: on 20 unseen "pebbles" scenes, the rank correlation of each signal with
the image's 1-click error for the demo's bootstrapped model was 0.75 (instability), 0.18 (low confidence),
0.04 (disagreement); a test-time-flip consistency tried beside them was -0.59 (docs/experiments/flywheel.md).
The other two are returned for inspection.
"""
from __future__ import annotations

import numpy as np
import torch

from model.amg_filters import point_grid, stability_score


@torch.no_grad()
def image_uncertainty(segmenter, image: np.ndarray, points_per_side: int = 8,
                      stability_offset: float = 1.0) -> dict:
    """Doubt of `segmenter` on one image (H, W, 3) uint8.

    Returns {score, low_confidence, instability, disagreement}: floats in [0, 1] (higher: less sure); score is
    the instability (module doc).
    """
    emb = segmenter.embed([image])[0]
    h, w = emb.original_size
    points = point_grid(points_per_side) * np.array([w, h], np.float32)  # (P, 2) XY pixels
    pred = segmenter.predict(emb, points=points[:, None, :], labels=np.ones((len(points), 1), np.int64),
                             multimask=True, upsample=False)
    logits = pred.low_res_logits  # (P, 3, 256, 256)
    iou = pred.iou_pred  # (P, 3)
    best = iou.argmax(dim=1)
    best_logits = logits[torch.arange(len(points)), best]
    stable = stability_score(best_logits, 0.0, stability_offset)
    masks = (logits > 0).flatten(2).float()  # (P, 3, n)
    inter = torch.einsum("pmn,pkn->pmk", masks, masks)
    area = masks.sum(-1)
    union = area[:, :, None] + area[:, None, :] - inter
    pair_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    agreement = pair_iou[:, off_diagonal].mean(dim=1)
    low_conf = 1 - iou.max(dim=1).values.clamp(0, 1)
    instability = 1 - stable
    disagreement = 1 - agreement
    parts = {"low_confidence": float(low_conf.mean()), "instability": float(instability.mean()),
             "disagreement": float(disagreement.mean())}
    return {"score": parts["instability"], **parts}
