"""Simulated clicks (pure numpy): SAM's evaluation protocol and its training-time sampling.

Evaluation (deterministic): the first click is the interior pixel farthest from the object's
boundary; each next click is the pixel farthest from the boundary of the larger error region —
"larger" meaning the one whose interior point lies deeper (RITM/SAM), so thin slivers along an edge
lose to a real missed part. The label is 1 (positive) for a missed region, 0 for a spurious one.
Training (random): points drawn uniformly from the object, then from the error region.
Coordinates are (x, y) pixel indices of the mask's image.
"""
from __future__ import annotations

import cv2
import numpy as np


def _check_mask(m: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"{name}: expected an (H, W) mask, got shape {m.shape}")
    return m.astype(bool, copy=False)


def interior_distance(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) float: distance of each inside pixel to the nearest outside pixel
    (the image border counts as outside); 0 outside."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    # OpenCV's precise L2 transform is exact (as scipy's distance_transform_edt, within 2e-6) and
    # 4x faster: the training loop draws first points by depth from ~100 masks a step.
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1].astype(np.float64)


def _deepest(mask: np.ndarray) -> tuple[int, int, float]:
    d = interior_distance(mask)
    i = int(np.argmax(d))
    y, x = divmod(i, mask.shape[1])
    return x, y, float(d[y, x])


def first_click(gt: np.ndarray) -> tuple[int, int]:
    """gt: (H, W) bool -> (x, y), the interior point farthest from the boundary."""
    gt = _check_mask(gt, "gt")
    if not gt.any():
        raise ValueError("gt: empty mask, no point to click")
    x, y, _ = _deepest(gt)
    return x, y


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int] | None:
    """pred, gt: (H, W) bool -> (x, y, label) at the deepest point of the larger error region
    (label 1: missed object pixels; 0: spurious pixels), or None if pred equals gt."""
    pred, gt = _check_mask(pred, "pred"), _check_mask(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred: shape {pred.shape} differs from gt {gt.shape}")
    fn, fp = gt & ~pred, pred & ~gt
    if not fn.any() and not fp.any():
        return None
    xn, yn, dn = _deepest(fn) if fn.any() else (0, 0, -1.0)
    xp, yp, dp = _deepest(fp) if fp.any() else (0, 0, -1.0)
    return (xn, yn, 1) if dn >= dp else (xp, yp, 0)


def sample_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly random (x, y) inside a non-empty (H, W) mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask: empty, no point to sample")
    i = int(rng.integers(len(xs)))
    return int(xs[i]), int(ys[i])


def sample_error_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """SAM's training click: uniform over the error region (pred xor gt); label 1 where gt is set.
    With no error left, a positive point inside gt."""
    err = pred ^ gt
    if not err.any():
        x, y = sample_point(gt, rng)
        return x, y, 1
    x, y = sample_point(err, rng)
    return x, y, int(gt[y, x])
