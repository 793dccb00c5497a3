"""The semi-automatic stage's plan (step 1): calibrated or verifier-chosen prefills, ranked and paged; the round's
files (stages/semi/__init__.py: the stage)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.integrations import runtime
from engine.integrations.annotator import objects_in_frame
from storage.coco import GTObject
from engine.integrations.config import EngineConfig
from engine.integrations.labelstudio import TaskImage
from model.amg import generate_with_fallback
from model.calibration import (Thresholds, best_match_iou, choose_thresholds, fit_verifier, generator_params,
                               history_samples)
from model.verifier import mask_features, triage_at_budget, uncovered_objectness
from model.segmenter import failure_kind
from storage.images import BadImage
from storage.rle import decode_rles, encode_masks


STAGE = "semi"
PLAN_FILE = "plan.json"
AUDIT_FILE = "audit.json"


# --------------------------------------------------------------------------- selection and paging

@dataclass
class Prefill:
    """One confident automatic mask offered to the annotator. rle: COCO RLE (counts: bytes) in pixels
    of the stored image; region_id: its Label Studio region id (stable: rank within the image)."""

    region_id: str
    page: int  # 1-based
    rle: dict
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]]
    crop_box: list[float]
    verifier_version: str | None = None  # the mask verifier that chose it (stages.semi.triage), and its score
    verifier_score: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        counts = self.rle["counts"]
        d["rle"] = {"size": list(self.rle["size"]), "counts": counts.decode() if isinstance(counts, bytes) else counts}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Prefill":
        d = dict(d)
        d["rle"] = {"size": d["rle"]["size"], "counts": d["rle"]["counts"].encode()}
        return cls(**d)


def rank_confident(masks: list, thresholds: Thresholds) -> list:
    """The masks (anything with predicted_iou / stability_score) clearing both thresholds, best first:
    by predicted IoU, then stability (descending)."""
    keep = [m for m in masks if m.predicted_iou >= thresholds.pred_iou_thresh
            and m.stability_score >= thresholds.stability_score_thresh]
    return sorted(keep, key=lambda m: (-m.predicted_iou, -m.stability_score))


def paginate(n: int, per_page: int, max_pages: int) -> tuple[list[range], int]:
    """Cut n ranked items into pages of at most `per_page`, at most `max_pages` pages.
    Returns (pages as index ranges, number dropped beyond the last page)."""
    if per_page < 1 or max_pages < 1:
        raise ValueError(f"paging: per_page ({per_page}) and max_pages ({max_pages}) must be >= 1")
    pages = [range(s, min(s + per_page, n)) for s in range(0, min(n, per_page * max_pages), per_page)]
    return pages, max(0, n - per_page * max_pages)


def plan_prefills(masks: list, thresholds: Thresholds, per_page: int, max_pages: int,
                  verdict: tuple[str, np.ndarray, np.ndarray] | None = None) -> tuple[list[Prefill], int]:
    """Generated masks of one image -> its prefills (ranked, paged) and how many confident ones were dropped.
    verdict: (verifier version, scores (N,), accepted (N,) bool) — the verifier's triage: the accepted masks
    ranked by score, instead of the thresholds' ranking."""
    scores = {}
    if verdict is None:
        ranked = rank_confident(masks, thresholds)
    else:
        version, score, accepted = verdict
        order = [i for i in np.argsort(-score, kind="stable") if accepted[i]]
        ranked = [masks[i] for i in order]
        scores = {id(masks[i]): float(score[i]) for i in order}
    pages, dropped = paginate(len(ranked), per_page, max_pages)
    out = []
    for page_no, idx in enumerate(pages, start=1):
        for i in idx:
            m = ranked[i]
            out.append(Prefill(region_id=f"prefill-{i}", page=page_no, rle=m.rle,
                               predicted_iou=float(m.predicted_iou), stability_score=float(m.stability_score),
                               point_coords=[list(map(float, p)) for p in m.point_coords],
                               crop_box=[float(v) for v in m.crop_box],
                               verifier_version=verdict[0] if verdict else None,
                               verifier_score=scores.get(id(m))))
    return out, dropped




# --------------------------------------------------------------------------- files

def _atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def round_dir(cfg: EngineConfig, round: int) -> Path:
    return Path(cfg.workdir).resolve() / "semi" / f"round-{round}"


# --------------------------------------------------------------------------- step 1: plan

def make_plan(cfg: EngineConfig, round: int, segmenter, store, source, image_ids: list[str],
              quarantine, truth: dict[str, list[GTObject]] | None = None) -> dict:
    """Calibrate, generate on the round's images and choose/page the prefills. Returns the plan (JSON-able):
    model_version, thresholds, history size, per image its size, prefills and how many were generated /
    dropped by the cap. With the truth (simulation) also `triage_comparison`: today's thresholds, the verifier
    and both, side by side on the round's candidates (`compare_triage`), whichever of them chose the prefills."""
    s = cfg.stages.semi
    grid = {"points_per_side": s.points_per_side} if s.points_per_side else {}
    loose, settings = runtime.calibration_params(cfg, **grid), runtime.calibration_settings(cfg)
    wants_verifier = s.triage != "thresholds" or truth is not None
    samples = history_samples(segmenter, store, source, round, loose, settings.history_images,
                              lambda thing, reason: quarantine.add(thing, reason, STAGE), settings.min_coverage,
                              with_features=wants_verifier)
    thresholds = choose_thresholds(samples, settings.target_precision, settings.precision_iou,
                                   settings.default_pred_iou_thresh, settings.default_stability_score_thresh,
                                   min_samples=settings.min_samples, min_kept=settings.min_kept,
                                   confidence=settings.confidence)
    amg = runtime.amg_params(cfg.stages.auto, **grid)
    strict = generator_params(amg, thresholds)
    # The learned verifier: fitted on the same history (also only to be compared, in simulation); it chooses
    # the prefills with stages.semi.triage verifier | both, and without enough history the thresholds do
    fitted, fitted_info = fit_verifier(samples, settings) if wants_verifier else (None, None)
    verifier, verifier_info = (fitted, fitted_info) if s.triage != "thresholds" else (None, None)
    candidates_params = generator_params(amg, Thresholds(loose.pred_iou_thresh, loose.stability_score_thresh,
                                                         "verifier", True, 0, 0, None, None, ""))
    if verifier is not None:
        verifier.save(round_dir(cfg, round) / "verifier.json")
    images, compared = {}, []
    for image_id in image_ids:
        ref = source.ref(image_id)
        try:
            loaded = source.load(ref)
            masks, _scale = generate_with_fallback(segmenter, loaded.pixels,
                                                   candidates_params if verifier is not None else strict)
            # the comparison judges every triage on the same candidates: the loose generator's
            candidates = masks if verifier is not None or truth is None else \
                generate_with_fallback(segmenter, loaded.pixels, candidates_params)[0]
        except BadImage as e:
            quarantine.add(ref.uri, str(e), STAGE, e.kind)
            continue
        except (RuntimeError, MemoryError) as e:
            quarantine.add(ref.uri, f"automatic generator failed at every scale ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]})", STAGE, failure_kind(e))
            continue
        rles = [m.rle for m in candidates]
        pred = np.array([m.predicted_iou for m in candidates])
        stab = np.array([m.stability_score for m in candidates])
        score = fitted.score(mask_features(loaded.pixels, rles, pred, stab)) if fitted is not None else None
        verdict = None
        if verifier is not None:
            accepted = score >= verifier_info["threshold"]
            if s.triage == "both":
                accepted &= (pred >= thresholds.pred_iou_thresh) & (stab >= thresholds.stability_score_thresh)
            verdict = (verifier.version, score, accepted)
        if truth is not None:
            gt = [o.mask for o in objects_in_frame(truth.get(image_id, []), *loaded.pixels.shape[:2])]
            compared.append((pred, stab, score, best_match_iou(rles, encode_masks(np.stack(gt)) if gt else [])))
        prefills, dropped = plan_prefills(masks, thresholds, s.max_prefill_per_task, s.max_pages_per_image, verdict)
        # How much of what looks like an object the prefills leave to the annotator (model/verifier.py)
        uncovered = None if verdict is None else float(f"{uncovered_objectness(rles, score, verdict[2]):.4f}")
        # Exhaustivity decides who finishes the image: one the verifier's prefills cover is complete without a person
        complete = (s.complete_below is not None and uncovered is not None and bool(prefills) and not dropped
                    and uncovered <= s.complete_below)
        h, w = loaded.pixels.shape[:2]
        images[image_id] = {"height": h, "width": w, "original_size": list(loaded.original_size),
                            "generated": len(masks), "confident": len(prefills) + dropped, "dropped_by_cap": dropped,
                            "uncovered": uncovered, "complete": complete, "prefills": [p.to_json() for p in prefills]}
    comparison = None
    if truth is not None and compared:
        comparison = compare_triage(*(np.concatenate([c[k] for c in compared]) for k in (0, 1)),
                                    None if fitted is None else np.concatenate([c[2] for c in compared]),
                                    np.concatenate([c[3] for c in compared]) >= s.precision_iou, thresholds,
                                    None if fitted is None else fitted_info["threshold"],
                                    cfg.simulate.triage_review_share)
        comparison["verifier_fitted"] = fitted_info.get("reason") if fitted is None else fitted.version
    return {"round": round, "model_version": segmenter.model_version, "thresholds": thresholds.to_dict(),
            "triage_asked": s.triage, "triage": s.triage if verifier is not None else "thresholds",
            "complete_below": s.complete_below,
            "verifier": verifier_info, "triage_comparison": comparison,
            "history_samples": thresholds.n_history, "image_ids": list(image_ids), "images": images}


def compare_triage(pred: np.ndarray, stab: np.ndarray, score: np.ndarray | None, right: np.ndarray,
                   thresholds: Thresholds, score_threshold: float | None, review_share: float) -> dict:
    """Today's triage, the verifier and both on one round's candidates at the same human effort (issue: a
    learned verifier): each method accepts what it trusts, people review the next `review_share` of the
    candidates by its ranking and keep the right ones (model/verifier.py `triage_at_budget`).
    pred, stab: (N,) the generator's scores; score: (N,) the verifier's (None: not fitted — it then falls back
    to the thresholds, as the stage does); right: (N,) bool, best IoU to the truth >= precision_iou.
    Returns {candidates, right, review_budget, iou | verifier | both: {precision, recall, auto_precision,
    auto_accepted}}."""
    budget = int(round(review_share * len(right)))
    by_iou = (pred >= thresholds.pred_iou_thresh) & (stab >= thresholds.stability_score_thresh)
    rank = pred if score is None else score
    by_ver = by_iou if score is None else score >= score_threshold
    out = {"candidates": int(len(right)), "right": int(right.sum()), "review_budget": budget,
           "review_share": review_share}
    for name, accept, order in (("iou", by_iou, pred), ("verifier", by_ver, rank), ("both", by_iou & by_ver, rank)):
        r = triage_at_budget(accept, order, right, budget)
        out[name] = {k: (None if r[k] is None else round(float(r[k]), 4)) for k in ("precision", "recall",
                                                                                   "auto_precision")}
        out[name]["auto_accepted"] = r["auto_accepted"]
    return out


def saved_or_new_plan(cfg: EngineConfig, round: int, segmenter, store, source, image_ids: list[str],
                      quarantine, truth: dict[str, list[GTObject]] | None = None) -> dict:
    """The round's plan: the saved one when it is for this model and these images (a rerun imports the same
    prefills with the same region ids), else a new one, saved before anything is imported."""
    plan_path = round_dir(cfg, round) / PLAN_FILE
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if (plan is None or plan.get("model_version") != segmenter.model_version or plan.get("image_ids") != list(image_ids)
            or plan.get("triage_asked", "thresholds") != cfg.stages.semi.triage
            or plan.get("complete_below") != cfg.stages.semi.complete_below):
        plan = make_plan(cfg, round, segmenter, store, source, image_ids, quarantine, truth)
        _atomic_write_json(plan_path, plan)
    return plan


@dataclass
class Pages:
    """The round's prefills as Label Studio sees them. prefills: image id -> its Prefills; masks: image id ->
    region id -> (h, w) bool in the task's frame (a large photo's task is a downscaled copy; final masks are
    stored at the file's size, `full_sizes`); last_page: image id -> its last page; projects: page -> project
    id; tasks: page -> image id -> task id; images: image id -> TaskImage."""

    prefills: dict[str, list[Prefill]]
    masks: dict[str, dict[str, np.ndarray]]
    last_page: dict[str, int]
    images: dict[str, TaskImage] = field(default_factory=dict)
    full_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # image id -> the file's (H, W)
    projects: dict[int, int] = field(default_factory=dict)
    tasks: dict[int, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: dict, image_ids: list[str] | None = None) -> "Pages":
        """The plan's pages of `image_ids` (None: every image)."""
        prefills = {i: [Prefill.from_json(p) for p in im["prefills"]] for i, im in plan["images"].items()
                    if image_ids is None or i in image_ids}
        masks = {}
        for image_id, ps in prefills.items():
            decoded = decode_rles([p.rle for p in ps]) if ps else []
            masks[image_id] = {p.region_id: d for p, d in zip(ps, decoded)}
        last_page = {i: max([1] + [p.page for p in ps]) for i, ps in prefills.items()}
        return cls(prefills, masks, last_page)

    @property
    def n_pages(self) -> int:
        return max([1] + list(self.last_page.values()))

    def on_page(self, image_id: str, page: int) -> list[Prefill]:
        return [p for p in self.prefills[image_id] if p.page == page]
