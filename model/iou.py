"""Mask IoU: the one definition every module uses.

Rule for empty masks: two masks that are both empty agree perfectly, IoU 1.0 (an annotator who left an empty
region empty made no edit); one empty and one not, IoU 0.0. pycocotools' `iou` gives 0.0 for the empty pair, but
no caller compares two empty masks through it: ground truth and model answers are never empty there.
"""
from __future__ import annotations

import numpy as np


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU over the last two axes. a, b: (..., H, W) bool, broadcastable -> (...) float64
    (a 0-d array for two (H, W) masks; `float()` it)."""
    inter = np.count_nonzero(a & b, axis=(-2, -1))
    union = np.count_nonzero(a | b, axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def pairwise_mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair. a: (P, H, W) bool, b: (T, H, W) bool -> (P, T) float64; same empty rule as mask_iou."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0).astype(np.float64)
