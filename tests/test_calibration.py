"""Prefill threshold calibration on crafted scores (model/calibration.py)."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from model.calibration import CalibrationSamples, best_match_iou, choose_thresholds, on_verified, wilson_lower_bound

DEFAULTS = dict(default_pred_iou=0.92, default_stability=0.95)


def _samples(pred, stab, iou) -> CalibrationSamples:
    return CalibrationSamples(np.asarray(pred, float), np.asarray(stab, float), np.asarray(iou, float))


def _precision(s: CalibrationSamples, a: float, b: float, precision_iou: float = 0.9) -> tuple[float, int]:
    keep = (s.pred_iou >= a) & (s.stability >= b)
    return float((s.best_iou[keep] >= precision_iou).mean()), int(keep.sum())


def test_wilson_bound_known_values():
    # 5/5 at 90 % one-sided: ~0.753 (a handful of lucky samples must not pass a 0.9 target).
    assert wilson_lower_bound(np.array(5), np.array(5), 0.9) == pytest.approx(0.7529, abs=1e-3)
    # Large samples converge to the proportion.
    assert wilson_lower_bound(np.array(9000), np.array(10000), 0.9) == pytest.approx(0.9, abs=0.005)
    assert wilson_lower_bound(np.array(0), np.array(0), 0.9) == 0.0
    lo = wilson_lower_bound(np.array([8, 80, 800]), np.array([10, 100, 1000]), 0.9)
    assert np.all(np.diff(lo) > 0) and np.all(lo < 0.8)


def test_no_history_gives_stated_defaults():
    t = choose_thresholds(CalibrationSamples.empty(), 0.9, 0.9, **DEFAULTS)
    assert (t.pred_iou_thresh, t.stability_score_thresh, t.source, t.reached) == (0.92, 0.95, "default", False)
    assert "no verified history" in t.reason


def test_too_little_history_gives_defaults():
    s = _samples([0.99] * 10, [0.99] * 10, [0.95] * 10)
    t = choose_thresholds(s, 0.9, 0.9, min_samples=50, **DEFAULTS)
    assert t.source == "default" and "10 < 50" in t.reason


def test_step_function_finds_the_boundary():
    """Masks with predicted IoU >= 0.8 are right, below are wrong; stability carries no signal."""
    rng = np.random.default_rng(0)
    n = 2000
    pred = rng.uniform(0.5, 1.0, n)
    stab = rng.uniform(0.7, 1.0, n)
    iou = np.where(pred >= 0.8, 0.95, 0.3)
    t = choose_thresholds(_samples(pred, stab, iou), 0.9, 0.9, **DEFAULTS)
    assert t.source == "calibrated" and t.reached
    # The loosest admissible predicted-IoU threshold sits just under the boundary (a few wrong ones let in),
    # and stability is not tightened because it buys nothing.
    assert 0.76 <= t.pred_iou_thresh <= 0.81
    assert t.stability_score_thresh == pytest.approx(stab.min())
    precision, kept = _precision(_samples(pred, stab, iou), t.pred_iou_thresh, t.stability_score_thresh)
    assert precision == pytest.approx(t.precision) and kept == t.n_kept
    assert t.precision_lower_bound >= 0.9


def test_chosen_thresholds_reach_target_and_are_loosest():
    """Correctness rises with both scores; the choice reaches the bound, and no pair keeping more does."""
    rng = np.random.default_rng(1)
    n = 1500
    # Scores on a 0.01 grid: few enough distinct pairs to check them all.
    pred = np.round(rng.uniform(0.6, 1.0, n), 2)
    stab = np.round(rng.uniform(0.6, 1.0, n), 2)
    p_right = np.clip((pred - 0.6) / 0.4 * 0.6 + (stab - 0.6) / 0.4 * 0.6, 0, 1)
    iou = np.where(rng.random(n) < p_right, 0.93, 0.5)
    s = _samples(pred, stab, iou)
    t = choose_thresholds(s, 0.9, 0.9, **DEFAULTS)
    assert t.reached
    precision, kept = _precision(s, t.pred_iou_thresh, t.stability_score_thresh)
    assert (precision, kept) == (pytest.approx(t.precision), t.n_kept)
    assert wilson_lower_bound(np.array(round(precision * kept)), np.array(kept), 0.9) >= 0.9
    for a in np.unique(pred):
        for b in np.unique(stab):
            keep = (pred >= a) & (stab >= b)
            k = int(keep.sum())
            if k > kept:
                right = int((iou[keep] >= 0.9).sum())
                assert k < 20 or wilson_lower_bound(np.array(right), np.array(k), 0.9) < 0.9


def test_stricter_target_gives_stricter_thresholds():
    rng = np.random.default_rng(2)
    n = 4000
    pred = rng.uniform(0.5, 1.0, n)
    stab = np.full(n, 0.97)
    iou = np.where(rng.random(n) < (pred - 0.5) * 2, 0.95, 0.2)
    s = _samples(pred, stab, iou)
    loose = choose_thresholds(s, 0.8, 0.9, **DEFAULTS)
    strict = choose_thresholds(s, 0.95, 0.9, **DEFAULTS)
    assert loose.reached and strict.reached
    assert strict.pred_iou_thresh > loose.pred_iou_thresh
    assert strict.n_kept < loose.n_kept


def test_precision_iou_matters():
    """Masks at IoU 0.85 count as right at precision_iou 0.8 and wrong at 0.9."""
    n = 400
    pred = np.linspace(0.5, 1.0, n)
    s = _samples(pred, np.full(n, 0.99), np.full(n, 0.85))
    assert choose_thresholds(s, 0.9, 0.8, **DEFAULTS).reached
    t = choose_thresholds(s, 0.9, 0.9, **DEFAULTS)
    assert not t.reached and t.source == "unreachable" and t.precision == 0.0


def test_unreachable_uses_best_lower_bound():
    rng = np.random.default_rng(3)
    n = 1000
    pred = rng.uniform(0.5, 1.0, n)
    # At best ~70 % right (top scores): 0.9 is out of reach.
    iou = np.where(rng.random(n) < (pred - 0.5) * 1.4, 0.95, 0.4)
    t = choose_thresholds(_samples(pred, np.full(n, 0.99), iou), 0.9, 0.9, **DEFAULTS)
    assert t.source == "unreachable" and not t.reached
    assert t.pred_iou_thresh > 0.8  # the best bound sits among the high scores
    assert t.precision_lower_bound < 0.9 and t.n_kept >= 20


def test_small_lucky_sample_is_not_trusted():
    """40 perfect masks above 0.95, plus many bad below: the 0.9-bound of 40/40 passes, of 8/8 it does not."""
    pred = np.r_[np.linspace(0.955, 0.999, 40), np.linspace(0.5, 0.9, 200)]
    iou = np.r_[np.full(40, 0.97), np.full(200, 0.3)]
    s = _samples(pred, np.full(240, 0.99), iou)
    t = choose_thresholds(s, 0.9, 0.9, min_kept=5, **DEFAULTS)
    # Loosest: the best wrong mask (0.9) gets in too, since 40/41 still bounds above 0.9; 40/42 would not.
    assert (t.n_kept, t.pred_iou_thresh, t.precision) == (41, 0.9, pytest.approx(40 / 41))
    few = _samples(np.r_[pred[:8], pred[40:]], np.full(208, 0.99), np.r_[iou[:8], iou[40:]])
    t = choose_thresholds(few, 0.9, 0.9, min_kept=5, **DEFAULTS)
    assert not t.reached  # 8/8 has a 90 % lower bound of ~0.83


def test_non_finite_scores_are_ignored():
    n = 300
    pred = np.linspace(0.5, 1.0, n)
    pred[:5] = np.nan
    s = _samples(pred, np.full(n, 0.99), np.where(pred >= 0.7, 0.95, 0.1))
    t = choose_thresholds(s, 0.9, 0.9, **DEFAULTS)
    assert t.reached and np.isfinite(t.pred_iou_thresh)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        _samples([0.9, 0.8], [0.9], [0.9])
    with pytest.raises(ValueError, match="target_precision"):
        choose_thresholds(CalibrationSamples.empty(), 1.5, 0.9, **DEFAULTS)


def test_best_match_iou():
    h = w = 20
    a = np.zeros((h, w), bool)
    a[2:10, 2:10] = True
    b = np.zeros((h, w), bool)
    b[2:10, 2:6] = True  # half of a
    c = np.zeros((h, w), bool)
    c[15:18, 15:18] = True

    def rle(m):
        return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))

    ious = best_match_iou([rle(a), rle(b), rle(c)], [rle(a), rle(b)])
    assert ious == pytest.approx([1.0, 1.0, 0.0])
    assert best_match_iou([rle(b)], [rle(a)]) == pytest.approx([0.5])
    assert best_match_iou([rle(a)], []).tolist() == [0.0]
    assert best_match_iou([], [rle(a)]).shape == (0,)


def test_only_masks_on_verified_masks_are_judged():
    """Annotators leave objects out: a generated mask mostly off every verified mask is not judged (it would
    count as a miss however right it is); one mostly on them is, right or wrong."""
    def rle(y0, y1, x0, x1):
        m = np.zeros((40, 40), np.uint8, order="F")
        m[y0:y1, x0:x1] = 1
        return mask_utils.encode(m)

    truth = [rle(0, 10, 0, 10), rle(20, 30, 20, 30)]
    pred = [rle(0, 10, 0, 10),    # exactly a verified mask
            rle(0, 10, 5, 15),    # half on one: judged at 0.5
            rle(0, 10, 6, 16),    # 40 % on one: not judged
            rle(0, 20, 0, 20),    # a merge of the first with background: 25 % on: not judged at 0.5
            rle(32, 40, 32, 40),  # an object nobody drew
            rle(0, 0, 0, 0)]      # empty
    assert on_verified(pred, truth, 0.5).tolist() == [True, True, False, False, False, False]
    assert on_verified(pred, truth, 0.2).tolist() == [True, True, True, True, False, False]
    assert on_verified(pred, [], 0.5).tolist() == [False] * 6 and on_verified([], truth, 0.5).shape == (0,)
    many = on_verified(pred * 50, truth, 0.5)  # a real history holds hundreds of masks per image
    assert many.tolist() == [True, True, False, False, False, False] * 50
