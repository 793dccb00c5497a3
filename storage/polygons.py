"""Masks as polygons, for the formats that want polygons (COCO polygons, YOLO segmentation).

COCO's polygons are drawn in pixel-corner coordinates (pixel (x, y) covers [x, x+1) x [y, y+1), pycocotools
rasterises them that way); Ultralytics' YOLO labels and the loaders that read them (cv2.fillPoly) use pixel
indices (a vertex at (x, y) is the centre of pixel (x, y)). `mask_to_polygons` writes either.

Holes and parts: COCO allows several polygons per object (the parts) but no holes, so each hole is joined to the
outline around it by a zero-width cut (a bridge between their nearest vertices); the polygon then traces the outline,
goes round the hole and comes back, and rasterises to the mask with the hole. YOLO allows one polygon per line:
`join_parts` bridges the parts into one polygon too (as Ultralytics' own COCO converter does).
"""
from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils

SUBPIXEL = 2  # contours are traced on the mask upsampled this much, so their vertices fall on pixel edges


def mask_to_polygons(mask: np.ndarray, tolerance_px: float = 0.25, frame: str = "corner",
                     join_parts: bool = False) -> list[list[float]]:
    """(H, W) bool -> polygons [[x0, y0, x1, y1, ...], ...] in pixels, one per part (holes bridged in).

    tolerance_px: Douglas-Peucker simplification (0: every contour vertex). frame: "corner" (COCO) or "center"
    (YOLO: vertices on the boundary pixels' centres). join_parts: one polygon for the whole mask. Parts with
    fewer than 3 vertices are dropped (a mask of a single pixel row still has 4)."""
    if frame not in ("corner", "center"):
        raise ValueError(f"frame {frame!r}: expected 'corner' or 'center'")
    up = SUBPIXEL if frame == "corner" else 1
    m = mask.astype(np.uint8)
    if up > 1:
        m = cv2.resize(m, (m.shape[1] * up, m.shape[0] * up), interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    tree = hierarchy[0]

    def simplified(c: np.ndarray) -> np.ndarray:
        c = cv2.approxPolyDP(c, tolerance_px * up, True) if tolerance_px > 0 else c
        return c.reshape(-1, 2).astype(np.float64)

    parts = []
    for k, contour in enumerate(contours):
        if tree[k][3] != -1:
            continue  # a hole: bridged into the outline around it below
        outline = simplified(contour)
        child = tree[k][2]
        while child != -1:  # this outline's holes
            hole = simplified(contours[child])
            if len(hole) >= 3 and len(outline) >= 3:
                outline = _bridge(outline, hole)
            child = tree[child][0]
        if len(outline) >= 3:
            parts.append(outline)
    if join_parts and len(parts) > 1:
        joined = parts[0]
        for part in parts[1:]:
            joined = _bridge(joined, part)
        parts = [joined]
    # corner frame: a vertex at the upsampled pixel centre i is at (i + 0.5) / up in pixel corners
    offset = 0.5 if up > 1 else 0.0
    return [((p + offset) / up).round(3).flatten().tolist() for p in parts]


def _bridge(outline: np.ndarray, other: np.ndarray) -> np.ndarray:
    """One polygon from two: along `outline` to its vertex nearest `other`, round `other` from its nearest vertex,
    and back (a zero-width cut)."""
    d = ((outline[:, None, :] - other[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return np.concatenate([outline[: i + 1], other[j:], other[: j + 1], outline[i:]])


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (pixel corners) -> (H, W) bool, as pycocotools rasterises them."""
    if not polygons:
        return np.zeros((height, width), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)
