"""Calibrated prefill thresholds: which automatic masks are confident enough to pre-fill a task.

The semi-automatic stage pre-fills each task with the automatic generator's masks whose predicted IoU and
stability score clear two thresholds. The thresholds are not guessed: they are chosen from human-verified
history so that the prefilled masks reach a target precision (e.g. 90 % of them with IoU >= 0.9 to a human
mask).

How the history is built (`history_samples`; the semi-automatic stage, and the automatic stage when
`stages.auto.calibrate` is set, call `calibrate` at the start of a round):
  1. Take the images of earlier rounds (manual or semi) that carry verified masks in the store, newest
     round first, up to a cap.
  2. Run the *current* round's model through the automatic generator on those images with loose filters
     (so the history spans the scores below any threshold we may pick) and no small-region cleanup changes
     beyond the stage's own.
  3. Match every generated mask to the verified masks of its image: its `best_iou` is the largest IoU to
     any of them (0 when the image has none that overlap).
  4. The samples are (predicted_iou, stability_score, best_iou) triples: `CalibrationSamples`.
Using the current model (not the scores saved at the time) matters: the model is retrained between rounds
and its scores shift. Annotators leave objects out (an image's time limit, the demo's about half of them), and a
generated mask of an object nobody drew would count as a miss: the measured precision fell far below the real
one (history precision 0.5 where the ground truth said 0.98, docs/experiments/flywheel.md). So a generated mask
lying mostly outside every verified mask of its image (less than `min_coverage` of its area on them) is left out
of the history: nobody has said whether it is right.

How thresholds are chosen (`choose_thresholds`): over candidate (pred_iou_thresh,
stability_score_thresh) pairs taken from the history's own values (every distinct predicted IoU; distinct
stability scores, thinned to quantiles on large histories), a pair *reaches* the target when the
one-sided Wilson lower confidence bound of its precision (share of kept samples with best_iou >=
precision_iou) is >= target_precision and it keeps at least `min_kept` samples. Among pairs that reach it,
the loosest wins: the one keeping the most samples (ties: the lower thresholds). The Wilson bound keeps a
handful of lucky samples from passing (5/5 correct has a 90 %-bound of only ~0.75). With fewer than
`min_samples` history samples the stated defaults are used; when no pair reaches the target, the pair with
the highest lower bound is used and the result says so (`reached=False`), so the stage's audit can show it.
The threshold choice is pure numpy (plus pycocotools for IoU); only `history_samples` runs the model and reads
the store.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Callable

import numpy as np
from pycocotools import mask as mask_utils

from model.amg import AmgParams, generate_masks
from model.verifier import MaskVerifier, auc, mask_features
from storage.images import BadImage, ImageSource
from storage.rle import rle_area
from storage.shards import MaskStore


@dataclass(frozen=True)
class CalibrationSamples:
    """History for calibration: one entry per generated mask of a verified image.

    pred_iou: (N,) float, the generator's predicted IoU; stability: (N,) float, its stability score;
    best_iou: (N,) float in [0, 1], IoU to the best-matching human-verified mask of the same image.
    """

    pred_iou: np.ndarray
    stability: np.ndarray
    best_iou: np.ndarray
    features: np.ndarray | None = None  # (N, len(model.verifier.FEATURES)) when the verifier is to learn from them

    def __post_init__(self) -> None:
        n = {len(self.pred_iou), len(self.stability), len(self.best_iou)}
        if self.features is not None:
            n.add(len(self.features))
        if len(n) != 1:
            raise ValueError(f"calibration samples: arrays differ in length ({sorted(n)})")

    def __len__(self) -> int:
        return len(self.pred_iou)

    @classmethod
    def empty(cls) -> "CalibrationSamples":
        z = np.zeros(0, np.float64)
        return cls(z, z, z)

    @classmethod
    def concat(cls, parts: list["CalibrationSamples"]) -> "CalibrationSamples":
        if not parts:
            return cls.empty()
        features = None if any(p.features is None for p in parts) else np.concatenate([p.features for p in parts])
        return cls(*(np.concatenate([getattr(p, f) for p in parts]).astype(np.float64)
                     for f in ("pred_iou", "stability", "best_iou")), features=features)


@dataclass(frozen=True)
class Thresholds:
    """The chosen prefill thresholds and why.

    source: "calibrated" (reached the target), "unreachable" (no pair reached it; best lower bound used),
    "default" (too little history). precision / precision_lower_bound: on the history kept by these
    thresholds (None for defaults). n_history: samples seen; n_kept: samples these thresholds keep.
    """

    pred_iou_thresh: float
    stability_score_thresh: float
    source: str
    reached: bool
    n_history: int
    n_kept: int
    precision: float | None
    precision_lower_bound: float | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def best_match_iou(pred_rles: list[dict], truth_rles: list[dict]) -> np.ndarray:
    """IoU of each predicted mask to its best-matching truth mask of the same image.

    pred_rles, truth_rles: COCO RLE dicts of one image (same size). Returns (N_pred,) float64;
    0 where there is no truth mask.
    """
    if not pred_rles:
        return np.zeros(0, np.float64)
    if not truth_rles:
        return np.zeros(len(pred_rles), np.float64)
    ious = np.asarray(mask_utils.iou(list(pred_rles), list(truth_rles), [0] * len(truth_rles)))
    return ious.reshape(len(pred_rles), len(truth_rles)).max(axis=1).astype(np.float64)


def on_verified(pred_rles: list[dict], truth_rles: list[dict], min_coverage: float) -> np.ndarray:
    """Which predicted masks lie on the verified ones: (N_pred,) bool, True where at least `min_coverage` of the
    mask's area is covered by the union of `truth_rles` (COCO RLE dicts of one image). Empty masks: False."""
    if not pred_rles:
        return np.zeros(0, bool)
    if not truth_rles:
        return np.zeros(len(pred_rles), bool)
    drawn = mask_utils.merge(list(truth_rles), intersect=False)
    areas = rle_area(list(pred_rles)).astype(np.float64)  # (pycocotools' own `area` fails past 255 masks)
    covered = rle_area([mask_utils.merge([p, drawn], intersect=True) for p in pred_rles]).astype(np.float64)
    return (areas > 0) & (covered >= min_coverage * areas)


def wilson_lower_bound(successes: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Wilson score lower bound of a binomial proportion.

    successes, n: arrays of counts (broadcast); confidence in (0.5, 1). Returns floats in [0, 1]; 0 where n == 0.
    """
    z = NormalDist().inv_cdf(confidence)
    k = np.asarray(successes, np.float64)
    m = np.asarray(n, np.float64)
    safe = np.maximum(m, 1.0)
    p = k / safe
    centre = p + z * z / (2 * safe)
    spread = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe))
    bound = (centre - spread) / (1 + z * z / safe)
    return np.where(m > 0, np.clip(bound, 0.0, 1.0), 0.0)


def _stability_grid(values: np.ndarray, max_candidates: int) -> np.ndarray:
    """Candidate stability thresholds (ascending): the distinct values, thinned to quantiles if too many."""
    distinct = np.unique(values)
    if len(distinct) <= max_candidates:
        return distinct
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, max_candidates), method="lower"))


def _pred_iou_cuts(pred: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct predicted-IoU threshold with its counts, exactly (sort + cumulative sums).

    pred: (M,) float; good: (M,) bool. Returns (thresholds (T,), kept (T,), good (T,)) where thresholds
    are the distinct values of `pred`, kept[t] = #(pred >= thresholds[t]), good[t] = # of those that are good.
    """
    order = np.argsort(-pred, kind="stable")
    p, g = pred[order], good[order]
    run_end = np.r_[p[1:] != p[:-1], True]  # a cut keeps a whole run of equal scores or none of it
    kept = np.arange(1, len(p) + 1)[run_end]
    return p[run_end], kept, np.cumsum(g)[run_end]


def choose_thresholds(samples: CalibrationSamples, target_precision: float, precision_iou: float,
                      default_pred_iou: float, default_stability: float, min_samples: int = 50,
                      min_kept: int = 20, confidence: float = 0.9,
                      max_stability_candidates: int = 64) -> Thresholds:
    """Choose (pred_iou_thresh, stability_score_thresh) reaching `target_precision` on the history (rule: module doc).

    A mask is kept when predicted_iou >= pred_iou_thresh and stability_score >= stability_score_thresh.
    Every distinct predicted IoU of the history is a candidate; stability candidates are its distinct
    values, thinned to `max_stability_candidates` quantiles on large histories.
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision: must be in (0, 1], got {target_precision}")
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0.5, 1), got {confidence}")
    n = len(samples)
    finite = np.isfinite(samples.pred_iou) & np.isfinite(samples.stability) & np.isfinite(samples.best_iou)
    pred, stab = samples.pred_iou[finite], samples.stability[finite]
    good = samples.best_iou[finite] >= precision_iou
    if len(pred) < min_samples:
        why = "no verified history" if n == 0 else f"too little verified history ({len(pred)} < {min_samples} samples)"
        return Thresholds(float(default_pred_iou), float(default_stability), "default", False, n, 0,
                          None, None, f"{why}: stated defaults")

    cols: list[tuple[np.ndarray, ...]] = []  # per stability candidate: (pred_thr, stab_thr, kept, good)
    for b in _stability_grid(stab, max_stability_candidates):
        sel = stab >= b
        thr, kept, good_kept = _pred_iou_cuts(pred[sel], good[sel])
        cols.append((thr, np.full(len(thr), b), kept, good_kept))
    pred_thr, stab_thr, kept, good_kept = (np.concatenate(c) for c in zip(*cols))
    lower = wilson_lower_bound(good_kept, kept, confidence)
    eligible = kept >= min_kept
    feasible = eligible & (lower >= target_precision)

    if feasible.any():
        # Loosest: most kept; among equals, the lower thresholds.
        idx = np.flatnonzero(feasible)
        best = idx[np.lexsort((stab_thr[idx], pred_thr[idx], -kept[idx]))[0]]
        source, reached = "calibrated", True
        reason = (f"loosest thresholds whose {confidence:.0%} lower bound of precision@IoU{precision_iou:g} "
                  f"reaches {target_precision:g}")
    elif eligible.any():
        # The highest lower bound; among equals, the one keeping most.
        idx = np.flatnonzero(eligible)
        best = idx[np.lexsort((stab_thr[idx], pred_thr[idx], -kept[idx], -lower[idx]))[0]]
        source, reached = "unreachable", False
        reason = (f"no thresholds reach precision {target_precision:g} (best {confidence:.0%} lower bound "
                  f"{lower[best]:.3f}); using the best")
    else:
        return Thresholds(float(default_pred_iou), float(default_stability), "default", False, n, 0,
                          None, None, f"no thresholds keep {min_kept} history samples: stated defaults")
    k, m = int(good_kept[best]), int(kept[best])
    return Thresholds(float(pred_thr[best]), float(stab_thr[best]), source, reached, n, m,
                      k / m, float(lower[best]), reason)


# --------------------------------------------------------------------------- history and the whole step

@dataclass
class CalibrationSettings:
    """What `calibrate` aims for (the config's `stages.semi` keys of the same meaning)."""

    target_precision: float
    precision_iou: float
    default_pred_iou_thresh: float
    default_stability_score_thresh: float
    history_images: int = 16
    min_coverage: float = 0.5  # generated masks with less of their area on verified masks are not judged
    min_samples: int = 50
    min_kept: int = 20
    confidence: float = 0.9


def loosest_threshold(scores: np.ndarray, good: np.ndarray, target_precision: float, confidence: float = 0.9,
                      min_kept: int = 5) -> tuple[float, bool]:
    """(threshold, reached): the lowest score threshold whose kept history (score >= it, at least `min_kept`)
    reaches `target_precision` at the Wilson lower bound (`confidence`), as model/calibration.py chooses its
    thresholds; when none does, the one with the best lower bound (reached False)."""
    order = np.argsort(-scores)
    hits = np.cumsum(np.asarray(good, np.float64)[order])
    n = np.arange(1, len(order) + 1, dtype=np.float64)
    lower = np.where(n >= min_kept, wilson_lower_bound(hits, n, confidence), -1.0)
    ok = np.nonzero(lower >= target_precision)[0]
    if len(ok):
        return float(scores[order][ok.max()]), True
    return float(scores[order][int(np.argmax(lower))]), False


def history_images(store: MaskStore, round: int, limit: int) -> list[str]:
    """Image ids with verified masks from rounds before `round`, newest round first, at most `limit`."""
    if round <= 0 or limit <= 0:
        return []
    table = store.read_table(columns=["image_id", "round"], verified=True, round=(0, round - 1))
    latest: dict[str, int] = {}
    for image_id, r in zip(table.column("image_id").to_pylist(), table.column("round").to_pylist()):
        latest[image_id] = max(r, latest.get(image_id, r))
    return sorted(latest, key=lambda i: (-latest[i], i))[:limit]


def history_samples(segmenter, store: MaskStore, source: ImageSource, round: int, loose: AmgParams, limit: int,
                    on_problem: Callable[[str, str], None] = lambda thing, reason: None,
                    min_coverage: float = 0.0, with_features: bool = False) -> CalibrationSamples:
    """Calibration samples: the generator (`loose` filters) on the verified images of earlier rounds, each
    generated mask matched to that image's verified masks; a mask with less than `min_coverage` of its area on
    the verified masks is left out (module doc). with_features: also each mask's `model.verifier.mask_features`
    (for `fit_verifier`). Images that can't be loaded or whose verified masks have
    another size are reported through `on_problem(thing, reason)` and skipped."""
    parts = []
    for image_id in history_images(store, round, limit):
        try:
            loaded = source.load(source.ref(image_id))
        except BadImage as e:
            on_problem(image_id, f"calibration image unreadable ({e})")
            continue
        h, w = loaded.original_size
        truth = [r.rle for r in store.iter_records(image_ids=[image_id], verified=True, round=(0, round - 1))
                 if (r.height, r.width) == (h, w)]
        if not truth:
            on_problem(image_id, f"verified masks are not {w}x{h} (the image's size)")
            continue
        masks = generate_masks(segmenter, loaded.pixels, loose, output_size=(h, w))
        if min_coverage > 0 and masks:
            judged = on_verified([m.rle for m in masks], truth, min_coverage)
            masks = [m for m, keep in zip(masks, judged) if keep]
        if not masks:
            continue
        pred = np.array([m.predicted_iou for m in masks], np.float64)
        stab = np.array([m.stability_score for m in masks], np.float64)
        parts.append(CalibrationSamples(
            pred, stab, best_match_iou([m.rle for m in masks], truth),
            mask_features(loaded.pixels, [m.rle for m in masks], pred, stab) if with_features else None))
    return CalibrationSamples.concat(parts)


def calibrate(segmenter, store: MaskStore, source: ImageSource, round: int, loose: AmgParams,
              settings: CalibrationSettings,
              on_problem: Callable[[str, str], None] = lambda thing, reason: None) -> Thresholds:
    """History of the current model on earlier rounds' verified images -> thresholds (module doc)."""
    samples = history_samples(segmenter, store, source, round, loose, settings.history_images, on_problem,
                              settings.min_coverage)
    return choose_thresholds(samples, settings.target_precision, settings.precision_iou,
                             settings.default_pred_iou_thresh, settings.default_stability_score_thresh,
                             min_samples=settings.min_samples, min_kept=settings.min_kept,
                             confidence=settings.confidence)


def fit_verifier(samples: CalibrationSamples, settings: CalibrationSettings, held_out: float = 0.25,
                 seed: int = 0) -> tuple[MaskVerifier | None, dict]:
    """The mask verifier learned from the history's decisions (a generated mask is right when its best IoU to a
    verified mask reaches `precision_iou`), promoted only when it ranks a held-out share of the decisions better
    than the predicted IoU does (ROC AUC, the held-out masks never seen in fitting); then refitted on all of them,
    its score threshold chosen by the thresholds' rule (`loosest_threshold`).
    Returns (verifier, {version, threshold, reached, n_history, held_out_auc, pred_iou_auc, reason}); (None,
    {…, reason}) with too little history, one kind of decision only, or no gain on the held-out share (the caller
    falls back to the thresholds)."""
    n = len(samples)
    good = samples.best_iou >= settings.precision_iou
    info = {"version": None, "threshold": None, "reached": False, "n_history": n, "held_out_auc": None,
            "pred_iou_auc": None}
    if samples.features is None or n < settings.min_samples or good.all() or not good.any():
        why = ("no features" if samples.features is None else
               f"too little history ({n} < {settings.min_samples} samples)" if n < settings.min_samples else
               f"the history has {'only right' if good.all() else 'no right'} masks")
        return None, dict(info, reason=f"verifier not fitted: {why}")
    # A held-out share of each kind of decision (stratified, so a rare kind is on both sides)
    rng, test = np.random.default_rng(seed), np.zeros(n, bool)
    for kind in (good, ~good):
        idx = np.flatnonzero(kind)
        if len(idx) >= 2:
            test[rng.choice(idx, max(1, int(round(held_out * len(idx)))), replace=False)] = True
    if good[test].all() or not good[test].any():
        return None, dict(info, reason=f"verifier not promoted: its held-out share ({int(test.sum())} masks, "
                                       f"{int(good[test].sum())} right) cannot tell it from the predicted IoU")
    trial = MaskVerifier.fit(samples.features[~test], good[~test])
    info["held_out_auc"] = auc(trial.score(samples.features[test]), good[test])
    info["pred_iou_auc"] = auc(samples.pred_iou[test], good[test])
    if info["held_out_auc"] is None or info["held_out_auc"] <= (info["pred_iou_auc"] or 0.0):
        return None, dict(info, reason=f"verifier not promoted: held-out AUC {info['held_out_auc'] or 0:.3f} is not "
                                       f"above the predicted IoU's {info['pred_iou_auc'] or 0:.3f}")
    verifier = MaskVerifier.fit(samples.features, good)
    threshold, reached = loosest_threshold(verifier.score(samples.features), good, settings.target_precision,
                                           settings.confidence, settings.min_kept)
    return verifier, dict(info, version=verifier.version, threshold=threshold, reached=reached,
                          reason=(f"held-out AUC {info['held_out_auc']:.3f} vs predicted IoU's "
                                  f"{info['pred_iou_auc']:.3f}; loosest score whose {settings.confidence:.0%} lower "
                                  f"bound of precision reaches {settings.target_precision:g}" if reached else
                                  f"no verifier score reaches precision {settings.target_precision:g}; using the best"))


def generator_params(params: AmgParams, thresholds: Thresholds) -> AmgParams:
    """`params` filtering at the chosen thresholds. The generator keeps predicted IoU > its threshold while
    calibration means >=: it is asked for a hair less, and callers that need the exact rule re-filter."""
    return replace(params, pred_iou_thresh=max(0.0, thresholds.pred_iou_thresh - 1e-6),
                   stability_score_thresh=thresholds.stability_score_thresh)
