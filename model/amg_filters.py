"""The pure pieces of automatic mask generation: point grids, crop boxes, stability, boxes, NMS,
the crop-edge filter and small-region clean-up.

Conventions (as SAM's AMG): boxes are XYXY pixels with *inclusive* right/bottom edges
(`x1` is the last column the mask touches); crop boxes are XYXY with *exclusive* ends.
Everything here is a plain function of arrays/tensors; no model, no I/O.
"""
from __future__ import annotations

import math
from itertools import product

import cv2
import numpy as np
import torch


def point_grid(n_per_side: int) -> np.ndarray:
    """Cell centres of an n x n grid over the unit square. Returns (n*n, 2) float XY in [0, 1], row-major."""
    centres = (np.arange(n_per_side, dtype=np.float64) + 0.5) / n_per_side
    xs, ys = np.meshgrid(centres, centres)  # xs varies along a row
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One grid per crop layer: layer i has n_per_side / downscale**i points per side (at least 1)."""
    return [point_grid(max(1, int(n_per_side / downscale**i))) for i in range(n_layers + 1)]


def crop_boxes(image_size: tuple[int, int], n_layers: int,
               overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """The whole image, then for layer i = 1..n_layers a (2^i) x (2^i) grid of overlapping crops.

    image_size: (H, W). Neighbouring crops of layer i overlap by overlap_ratio * short side * 2 / 2^i
    pixels. Returns (boxes XYXY exclusive-end pixels, layer index per box); layer 0 is the full image.
    """
    h, w = image_size
    boxes, layers = [[0, 0, w, h]], [0]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * min(h, w) * 2 / n)
        crop_w = math.ceil((overlap * (n - 1) + w) / n)
        crop_h = math.ceil((overlap * (n - 1) + h) / n)
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)])
            layers.append(layer)
    return boxes, layers


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks `logits > threshold + offset` and `logits > threshold - offset`.

    logits: (N, h, w) float. The high mask lies inside the low one, so IoU = |high| / |low|.
    Returns (N,) float32; an empty low mask scores 0.
    """
    high = (logits > threshold + offset).flatten(1).sum(1, dtype=torch.int32)
    low = (logits > threshold - offset).flatten(1).sum(1, dtype=torch.int32)
    return torch.where(low > 0, high.float() / low.clamp(min=1).float(), torch.zeros_like(high, dtype=torch.float32))


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around masks. masks: (N, H, W) bool -> (N, 4) int64 XYXY inclusive; empty masks get 0s."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.int64)
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    ys = torch.arange(h)
    xs = torch.arange(w)
    y1 = torch.where(rows, ys, -1).amax(1)
    y0 = torch.where(rows, ys, h).amin(1)
    x1 = torch.where(cols, xs, -1).amax(1)
    x0 = torch.where(cols, xs, w).amin(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where((y1 >= 0)[:, None], boxes, torch.zeros_like(boxes))


def box_iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) against boxes (M, 4), XYXY, area = (x1 - x0) * (y1 - y0). Returns (M,) float32."""
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.float32(0))
    return iou.astype(np.float32, copy=False)


def nms(boxes: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor,
        iou_threshold: float) -> np.ndarray:
    """Greedy box non-maximum suppression.

    boxes: (N, 4) XYXY; scores: (N,). Boxes are visited by descending score (ties keep input order);
    a box is dropped when its IoU with an already kept box is > iou_threshold.
    Returns the kept indices (int64), highest score first. Memory O(N): IoU rows are computed
    only for kept boxes, against the boxes after them.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(-scores, kind="stable")
    ordered = boxes[order]
    alive = np.ones(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(order[i])
        rest = slice(i + 1, len(order))
        alive[rest] &= box_iou_one_to_many(ordered[i], ordered[rest]) <= iou_threshold
    return np.asarray(keep, dtype=np.int64)


def near_crop_edge(boxes: torch.Tensor, crop_box: list[int], image_box: list[int],
                   atol: float = 20.0) -> torch.Tensor:
    """Which boxes touch an *inner* edge of their crop (an edge that is not the image's edge).

    boxes: (N, 4) XYXY in image pixels; crop_box, image_box: XYXY. A side counts as touching when it
    lies within `atol` pixels of the crop's side and not within `atol` of the image's. Returns (N,) bool.
    """
    boxes = boxes.float()
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)[None]
    image = torch.as_tensor(image_box, dtype=torch.float32, device=boxes.device)[None]
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


def remove_small_regions(mask: np.ndarray, min_area: int, mode: str,
                         outside: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Fill holes or drop islands smaller than `min_area` pixels (8-connectivity).

    mask: (H, W) bool. mode "holes": background components smaller than min_area become mask;
    "islands": mask components smaller than min_area are removed, but if all are small the
    largest stays. outside: optional (H, W) bool marking background pixels that stand for the
    rest of a bigger image (a border around a patch): components containing one are never small.
    Returns (new mask, whether it changed).
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"remove_small_regions: mode must be 'holes' or 'islands', not {mode!r}")
    fill_holes = mode == "holes"
    work = (mask ^ fill_holes).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(work, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < min_area
    if outside is not None and fill_holes and n_labels > 1:
        touching = np.unique(labels[outside])
        small[touching[touching > 0] - 1] = False
    if not small.any():
        return mask, False
    big = 1 + np.flatnonzero(~small)
    if fill_holes:
        return ~np.isin(labels, big), True
    if len(big) == 0:
        big = np.array([1 + int(np.argmax(sizes))])
    return np.isin(labels, big), True


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices and the weight of the second for each output index of a 1-D bilinear
    resize, as torch's `F.interpolate(mode="bilinear", align_corners=False)` computes them (float32).

    Returns (lo (out,) int64, hi (out,) int64, w_hi (out,) float32): out[i] = (1 - w_hi) in[lo] + w_hi in[hi].
    """
    # torch: a float32 scale times (index + 0.5) in double, the result rounded to float32
    scale = np.float64(np.float32(in_size / out_size))
    src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0).astype(np.float32)
    lo = src.astype(np.int64)
    hi = lo + (lo < in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_window(x: np.ndarray, rows: tuple[np.ndarray, np.ndarray, np.ndarray],
                  cols: tuple[np.ndarray, np.ndarray, np.ndarray], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0:r1, cols c0:c1 of the bilinear resize of x (h, w) float32, without making the rest.

    rows / cols: `bilinear_taps(h, H)` / `bilinear_taps(w, W)` of the full resize. Returns (r1 - r0, c1 - c0).
    """
    lo, hi, wy = (a[r0:r1] for a in rows)
    t = x[lo] * (1 - wy)[:, None] + x[hi] * wy[:, None]
    lo, hi, wx = (a[c0:c1] for a in cols)
    return t[:, lo] * (1 - wx) + t[:, hi] * wx


def support_window(low_rows: np.ndarray, low_cols: np.ndarray, rows: tuple[np.ndarray, np.ndarray, np.ndarray],
                   cols: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, int, int, int] | None:
    """The output window outside of which a bilinear resize can't exceed a level.

    low_rows (h,) / low_cols (w,) bool: which source rows / columns hold a value above the level.
    A resized value is a convex mix of its taps, so it can exceed the level only where a tap does.
    Returns (r0, r1, c0, c1) half-open, or None when no source value is above the level.
    """
    r = np.flatnonzero(low_rows[rows[0]] | low_rows[rows[1]])
    c = np.flatnonzero(low_cols[cols[0]] | low_cols[cols[1]])
    if len(r) == 0 or len(c) == 0:
        return None
    return int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
