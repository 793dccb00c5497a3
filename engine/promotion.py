"""Promotion between rounds: the paired bootstrap interval over holdout masks, the forgetting policy, and the
lines that name a model that learned nothing."""

from pathlib import Path

import numpy as np

from storage.coco import read_coco
from engine.ledger import StepFailed


def paired_interval(candidate: list[float], current: list[float], confidence: float, resamples: int = 4000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences candidate - current (one per holdout mask) and its two-sided percentile
    bootstrap interval at `confidence`: (mean, low, high)."""
    d = np.asarray(candidate, np.float64) - np.asarray(current, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def metric_label(metric: str | dict[str, float]) -> str:
    """The promote metric as shown: its name, or the weighted mix ("0.5 miou@1 + 0.5 box_miou")."""
    if isinstance(metric, str):
        return metric
    total = sum(metric.values())
    return " + ".join(f"{w / total:.2g} {name}" for name, w in metric.items() if w > 0)


def metric_scores(evaluation: dict, metric: str | dict[str, float]) -> tuple[float | None, list[float] | None]:
    """An evaluation's score on `metric` (a name, or {name: weight}: the weighted mean) and its per-mask
    scores (None when the metric has none, e.g. AP). A mix needs every part per mask."""
    weights = {metric: 1.0} if isinstance(metric, str) else {k: float(w) for k, w in metric.items() if w > 0}
    total = sum(weights.values())
    if any(evaluation.get(k) is None for k in weights):
        return None, None
    score = sum(w * evaluation[k] for k, w in weights.items()) / total
    per = evaluation.get("per_mask") or {}
    if any(not per.get(k) for k in weights) or len({len(per[k]) for k in weights}) != 1:
        return score, None
    per_mask = (sum(w * np.asarray(per[k], np.float64) for k, w in weights.items()) / total).tolist()
    return score, per_mask


FORGETTING = ("weigh", "block", "report")


def promotion_decision(metric: str | dict[str, float], candidate: dict, current: dict | None, min_delta: float,
                       confidence: float = 0.95, general_max_drop: float | None = None, start: dict | None = None,
                       forgetting: str = "weigh", forgetting_share: float = 0.25) -> dict:
    """Promote only if the candidate is better than the current model on `metric` by more than `min_delta`,
    and (with a general holdout) does not forget the starting domain beyond what the policy allows.

    `metric`: a holdout metric's name, or {name: weight} for a weighted mix of per-mask metrics. With both
    models' per-mask scores on the holdout (`per_mask`, the same masks in the same order) and `confidence` > 0,
    "better" is the paired test: the lower end of the bootstrap interval of the mean per-mask difference must
    exceed `min_delta`, so a difference the holdout cannot tell from noise is not promoted. Otherwise (an AP
    metric, or confidence 0) the plain difference of the means decides.

    Forgetting is measured whenever the evaluations hold a `general` evaluation (a general holdout of the
    starting domain): against the model in use, and cumulatively against the starting model (`start`, the
    round-0 evaluation), so drops within the allowance cannot add up round after round. `forgetting` says what
    a fall does: "weigh" refuses a fall larger than max(`general_max_drop`, `forgetting_share` x the
    candidate's gain on the holdout) — a large gain on the user's own images is not thrown away for a small
    loss on the starting domain; "block" refuses any fall beyond `general_max_drop`; "report" never refuses.
    `general_max_drop` None: the old switch for no guard (as "report").
    Returns {promoted, metric, candidate, current, delta, interval, test, general, reason}; `current` None
    promotes.
    """
    if forgetting not in FORGETTING:
        raise ValueError(f"forgetting: {forgetting!r} is not one of {FORGETTING}")
    label = metric_label(metric)
    cand, a = metric_scores(candidate, metric)
    if cand is None:
        raise StepFailed(f"promote: the evaluation has no '{label}' (has: "
                         f"{', '.join(sorted(k for k in candidate if k not in ('per_mask', 'general')))})")
    cur, b = (None, None) if current is None else metric_scores(current, metric)
    if cur is None:
        return {"promoted": True, "metric": label, "candidate": cand, "current": None, "general": None,
                "reason": f"no score for the current model; candidate {label} {cand:.4f}"}
    if confidence > 0 and a and b and len(a) == len(b):
        delta, low, high = paired_interval(a, b, confidence)
        promoted = low > min_delta
        interval, test = [round(low, 4), round(high, 4)], f"paired bootstrap over {len(a)} holdout masks"
        shown = f"{delta:+.4f}, {confidence:.0%} interval [{low:+.4f}, {high:+.4f}]"
    else:
        delta = cand - cur
        promoted, interval, test = delta > min_delta, None, "difference of means"
        shown = f"{delta:+.4f}"
    general = _forgetting(metric, candidate, current, start, cand, cur,
                          "report" if general_max_drop is None else forgetting, general_max_drop or 0.0,
                          forgetting_share)
    if promoted and general is not None and not general["ok"]:
        promoted = False
        reason = (f"kept current model: candidate {label} {cand:.4f} beats current {cur:.4f} ({shown}) but forgets "
                  f"the general holdout: {general['why']}")
    elif promoted:
        reason = f"candidate {label} {cand:.4f} beats current {cur:.4f} ({shown})"
    else:
        reason = (f"kept current model: candidate {label} {cand:.4f} vs current {cur:.4f} is not better by "
                  f"more than {min_delta:g} ({shown})")
    if general is not None and promoted:
        reason += (f"; general holdout {general['delta']:+.4f}"
                   + (f" (from the start {general['cumulative_delta']:+.4f})"
                      if general.get("cumulative_delta") is not None else "")
                   + (f", within the {general['allowed']:.4f} allowed" if general["policy"] != "report" else
                      ", reported only"))
    return {"promoted": promoted, "metric": label, "candidate": cand, "current": cur, "delta": delta,
            "interval": interval, "test": test, "general": general, "reason": reason}


def _forgetting(metric, candidate: dict, current: dict, start: dict | None, cand: float, cur: float, policy: str,
                max_drop: float, share: float) -> dict | None:
    """The general holdout's verdict (see promotion_decision), or None when it was not evaluated."""
    if not candidate.get("general") or not (current or {}).get("general"):
        return None
    g_cand, _ = metric_scores(candidate["general"], metric)
    g_cur, _ = metric_scores(current["general"], metric)
    if g_cand is None or g_cur is None:
        return None

    def allowance(gain: float) -> float:
        return max_drop if policy == "block" else max(max_drop, share * max(gain, 0.0))

    out = {"candidate": g_cand, "current": g_cur, "delta": g_cand - g_cur, "max_drop": max_drop, "policy": policy,
           "allowed": allowance(cand - cur), "start": None, "cumulative_delta": None, "allowed_cumulative": None}
    falls = []
    if out["delta"] < -out["allowed"]:
        falls.append(f"{g_cand:.4f} vs {g_cur:.4f} for the model in use ({out['delta']:+.4f}, more than the "
                     f"{out['allowed']:.4f} allowed)")
    g_start = metric_scores(start["general"], metric)[0] if (start or {}).get("general") else None
    s_score = metric_scores(start, metric)[0] if start else None
    if g_start is not None and s_score is not None:
        out.update(start=g_start, cumulative_delta=g_cand - g_start, allowed_cumulative=allowance(cand - s_score))
        if out["cumulative_delta"] < -out["allowed_cumulative"]:
            falls.append(f"{g_cand:.4f} vs {g_start:.4f} for the starting model ({out['cumulative_delta']:+.4f}, "
                         f"more than the {out['allowed_cumulative']:.4f} allowed)")
    out["ok"] = policy == "report" or not falls
    out["why"] = "; ".join(falls)
    return out


def trivial_baseline(coco_json: str | Path) -> float | None:
    """The holdout mIoU of a model that answers every click with the whole image: the mean over the holdout's
    masks of (mask area / image area). (An empty answer scores 0.) None without masks."""
    shares = [a["area"] / (im.height * im.width) for im in read_coco(coco_json) if im.height * im.width
              for a in im.annotations]
    return float(np.mean(shares)) if shares else None


def learned_nothing(evaluation: dict, baseline: float | None, margin: float = 0.02) -> str | None:
    """One line when the holdout's 1-click mIoU sits at a trivial answer's (whole-image masks: `baseline`;
    empty masks: 0), else None."""
    score = evaluation.get("miou@1")
    if score is None:
        return None
    if baseline is not None and abs(score - baseline) <= margin:
        return (f"holdout 1-click mIoU {score:.3f} is what whole-image masks score ({baseline:.3f}): the model "
                f"has learned nothing usable; likely causes: too few training steps (model.bootstrap_steps, "
                f"train.steps) or a start unsuited to these images")
    if score <= margin:
        return (f"holdout 1-click mIoU {score:.3f} is what empty masks score: the model has learned nothing "
                f"usable; likely causes: too few training steps (model.bootstrap_steps, train.steps) or a start "
                f"unsuited to these images")
    return None
