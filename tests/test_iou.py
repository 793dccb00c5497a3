"""The one mask-IoU definition, against pycocotools on real masks, and its rule for empty masks."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from model.iou import mask_iou, pairwise_mask_iou


def _random_masks(rng, n, h=40, w=50):
    out = np.zeros((n, h, w), bool)
    for m in out:
        y0, x0 = rng.integers(0, h - 5), rng.integers(0, w - 5)
        m[y0:y0 + rng.integers(3, h - y0), x0:x0 + rng.integers(3, w - x0)] = True
        m &= rng.random((h, w)) < 0.9
    return out


def test_matches_pycocotools_on_non_empty_masks():
    rng = np.random.default_rng(0)
    a, b = _random_masks(rng, 7), _random_masks(rng, 5)
    enc = lambda m: mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))  # noqa: E731
    ref = np.asarray(mask_utils.iou(enc(a), enc(b), [0] * len(b)))
    assert np.allclose(pairwise_mask_iou(a, b), ref, atol=1e-6)
    assert np.allclose(mask_iou(a[:5], b), np.diag(ref[:5, :5]), atol=1e-6)
    assert np.allclose(mask_iou(a[:, None], b[None]), ref, atol=1e-6)  # broadcast over leading axes


def test_known_values_and_the_empty_rule():
    a = np.zeros((10, 10), bool)
    b = a.copy()
    a[:5] = True
    b[:, :5] = True
    assert float(mask_iou(a, b)) == 25 / 75
    empty = np.zeros((10, 10), bool)
    assert float(mask_iou(empty, empty)) == 1.0  # both empty: they agree
    assert float(mask_iou(a, empty)) == 0.0
    assert pairwise_mask_iou(np.stack([empty, a]), np.stack([empty])).tolist() == [[1.0], [0.0]]
    assert pairwise_mask_iou(a[None][:0], a[None]).shape == (0, 1)
