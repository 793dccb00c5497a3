"""A learned mask verifier: P(a generated mask would be accepted as it is), from the image, the mask and the
generator's own scores — SAM 3's data engine replaced most human checking with verifiers trained on its
people's accept / reject decisions; this is the small version of that idea for our engine.

Features per mask (`mask_features`, all cheap, from the image at the mask's size):
    pred_iou, stability        the generator's scores (today's triage uses these two alone)
    log_area                   log of the mask's share of the image
    border                     sides of the image the mask touches (0..4) / 4
    edge_contrast              mean image gradient on the mask's boundary / the image's mean gradient
    colour_gap                 distance of the mean colour inside to a 3 px ring outside, / 255
    interior_spread            mean colour standard deviation inside, / 255 (one object is often one colour)
    compactness                4π area / perimeter², in (0, 1]
    overlap                    the largest IoU with another candidate of the same image (duplicates, parts)
Model (`MaskVerifier`): logistic regression on the standardised features and their squares, fitted by Newton's
method with an L2 penalty; a handful of numbers, saved as JSON, versioned by their digest (`version`).
Exhaustivity (`uncovered_objectness`): how much of what the generator finds object-like no kept mask covers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.rle import decode_rles

FEATURES = ("pred_iou", "stability", "log_area", "border", "edge_contrast", "colour_gap", "interior_spread",
            "compactness", "overlap")


def _boundary(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> the masks' inner boundary pixels (4-neighbourhood), (N, H, W) bool."""
    pad = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    inner = pad[:, 1:-1, 1:-1] & pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
    return masks & ~inner


def _dilate(masks: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by r pixels, (N, H, W) bool."""
    out = masks.copy()
    for _ in range(r):
        pad = np.pad(out, ((0, 0), (1, 1), (1, 1)))
        out = (pad[:, 1:-1, 1:-1] | pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:])
    return out


def mask_features(image: np.ndarray, rles: list[dict], pred_iou, stability) -> np.ndarray:
    """image: (H, W, 3) uint8 (resized to the masks' size when it differs); rles: N COCO RLEs of one image; pred_iou, stability: (N,).
    Returns (N, len(FEATURES)) float64."""
    n = len(rles)
    if n == 0:
        return np.zeros((0, len(FEATURES)))
    masks = decode_rles(rles)
    h, w = masks.shape[1:]
    if image.shape[:2] != (h, w):  # an image the source downscaled: nearest pixels at the masks' size
        image = image[(np.arange(h) * image.shape[0] // h)[:, None], (np.arange(w) * image.shape[1] // w)[None, :]]
    img = image.astype(np.float32)
    grey = img.mean(axis=2)
    gy, gx = np.gradient(grey)
    grad = np.hypot(gx, gy)
    mean_grad = float(grad.mean()) + 1e-6
    area = masks.reshape(n, -1).sum(axis=1).astype(np.float64)
    safe = np.maximum(area, 1.0)
    edge = _boundary(masks)
    perimeter = np.maximum(edge.reshape(n, -1).sum(axis=1).astype(np.float64), 1.0)
    ring = _dilate(masks, 3) & ~masks
    ring_area = np.maximum(ring.reshape(n, -1).sum(axis=1).astype(np.float64), 1.0)
    flat = img.reshape(-1, 3).astype(np.float64)
    m = masks.reshape(n, -1).astype(np.float64)
    rg = ring.reshape(n, -1).astype(np.float64)
    inside = m @ flat / safe[:, None]
    outside = rg @ flat / ring_area[:, None]
    spread = np.sqrt(np.maximum(m @ flat ** 2 / safe[:, None] - inside ** 2, 0.0)).mean(axis=1)
    edge_contrast = (edge.reshape(n, -1) * grad.reshape(1, -1)).sum(axis=1) / perimeter / mean_grad
    border = (masks[:, 0, :].any(1).astype(int) + masks[:, -1, :].any(1) + masks[:, :, 0].any(1)
              + masks[:, :, -1].any(1)) / 4.0
    inter = m @ m.T
    union = area[:, None] + area[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)
    np.fill_diagonal(iou, 0.0)
    return np.stack([
        np.asarray(pred_iou, np.float64), np.asarray(stability, np.float64),
        np.log(safe / (h * w)), border, edge_contrast,
        np.linalg.norm(inside - outside, axis=1) / 255.0, spread / 255.0,
        np.minimum(4 * np.pi * area / perimeter ** 2, 1.0), iou.max(axis=1) if n > 1 else np.zeros(n),
    ], axis=1)


def _expand(x: np.ndarray) -> np.ndarray:
    """Standardised features -> the model's inputs: the features, their squares and a constant."""
    return np.concatenate([x, x ** 2, np.ones((len(x), 1))], axis=1)


@dataclass
class MaskVerifier:
    """Logistic regression over `FEATURES` (module doc). mean / std standardise the features; weights act on
    [features, features², 1]."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, accepted: np.ndarray, l2: float = 1.0, iterations: int = 50) -> "MaskVerifier":
        """features: (N, F); accepted: (N,) bool (the decision: kept as it is). Newton's method on the penalised
        log-likelihood (the constant is not penalised). Raises ValueError without both kinds of decision."""
        y = np.asarray(accepted, np.float64)
        if len(y) == 0 or y.min() == y.max():
            raise ValueError(f"verifier: needs accepted and rejected masks to learn from ({int(y.sum())} of "
                             f"{len(y)} accepted)")
        mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
        x = _expand((features - mean) / std)
        w = np.zeros(x.shape[1])
        penalty = np.full(x.shape[1], l2)
        penalty[-1] = 0.0
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
            grad = x.T @ (p - y) + penalty * w
            hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(mean, std, w)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N,) P(accepted as it is)."""
        if len(features) == 0:
            return np.zeros(0)
        return 1.0 / (1.0 + np.exp(-np.clip(_expand((features - self.mean) / self.std) @ self.weights, -30, 30)))

    def to_json(self) -> dict:
        return {"features": list(FEATURES), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "weights": self.weights.tolist()}

    @property
    def version(self) -> str:
        """The verifier's version: `verifier-` + a digest of its numbers (lineage names it so)."""
        return "verifier-" + hashlib.sha256(json.dumps(self.to_json()).encode()).hexdigest()[:12]

    def save(self, path: str | Path) -> str:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(dict(self.to_json(), version=self.version)))
        tmp.replace(p)
        return self.version

    @classmethod
    def load(cls, path: str | Path) -> "MaskVerifier":
        d = json.loads(Path(path).read_text())
        if d.get("features") != list(FEATURES):
            raise ValueError(f"{path}: a verifier over other features ({d.get('features')})")
        return cls(np.asarray(d["mean"]), np.asarray(d["std"]), np.asarray(d["weights"]))


# Object-like for the exhaustivity estimate: a verifier's P(right) of 0.3 or more. benchmarks/verifier.py's
# exhaustivity AUC with this cut: 0.883; at 0.5: 0.797; at 0.7: 0.633 (a missed object often scores low).
OBJECT_LIKE = 0.3


def uncovered_objectness(rles_all: list[dict], objectness, kept: np.ndarray,
                         min_objectness: float = OBJECT_LIKE) -> float:
    """Exhaustivity estimate of one image: the share of the union of object-like candidates (`objectness` >=
    `min_objectness`) that no kept mask covers; 0 = nothing object-like left uncovered. rles_all: every
    candidate; objectness: (N,) per candidate — the verifier's P(right) where one is fitted (calibrated on the
    engine's own decisions, unlike a young model's IoU head, which sits far below SAM's and would find nothing
    object-like), else the predicted IoU; kept: (N,) bool."""
    objectish = [r for r, s in zip(rles_all, objectness) if s >= min_objectness]
    if not objectish:
        return 0.0
    union = decode_rles(objectish).any(axis=0)
    kept_rles = [r for r, k in zip(rles_all, kept) if k]
    covered = decode_rles(kept_rles).any(axis=0) if kept_rles else np.zeros_like(union)
    return float((union & ~covered).sum() / max(union.sum(), 1))


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    s, y = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if y.all() or not y.any():
        return None
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def triage_at_budget(accept: np.ndarray, rank: np.ndarray, right: np.ndarray, budget: int) -> dict:
    """One triage at a fixed human effort: the `accept`ed masks are taken without a person; people review the
    `budget` best-`rank`ed of the rest and keep the right ones; the others are dropped.
    accept, right: (N,) bool; rank: (N,) float, higher first. Returns precision and recall of everything kept
    (against every right mask), auto_precision (of the accepted alone; None when none), auto_accepted, reviewed,
    final: (N,) bool."""
    accept, right, rank = np.asarray(accept, bool), np.asarray(right, bool), np.asarray(rank, np.float64)
    rest = np.flatnonzero(~accept)
    reviewed = rest[np.argsort(-rank[rest], kind="stable")][:max(0, budget)]
    final = accept.copy()
    final[reviewed[right[reviewed]]] = True
    n_right = int(right.sum())
    return {"precision": float(right[final].mean()) if final.any() else 0.0,
            "recall": float(right[final].sum() / n_right) if n_right else 0.0,
            "auto_precision": float(right[accept].mean()) if accept.any() else None,
            "auto_accepted": int(accept.sum()), "reviewed": int(len(reviewed)), "final": final}
