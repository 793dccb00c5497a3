"""Stage 2, semi-automatic: the model pre-fills what it is sure of, annotators add what it missed.

`run_semi_stage` reads as the paper's stage 2, one named step each:
  1. Plan (`make_plan`): calibrate (model/calibration.py: re-run the current model's automatic generator with
     loose filters on the verified images of earlier rounds, match its masks to the verified ones, choose the
     loosest (pred_iou_thresh, stability_score_thresh) whose precision lower bound reaches `target_precision`;
     with too little history, the stated defaults), generate with those thresholds on the round's images, rank
     the confident masks by predicted IoU (then stability) — or, with `stages.semi.triage: verifier | both`,
     fit the mask verifier (model/verifier.py) on the same history's decisions, prefill what its score (and,
     for "both", the thresholds) accepts at the same target, ranked by its score, each prefill carrying the
     verifier's version and score into the lineage — and cut them into pages of at most
     `max_prefill_per_task` (Label Studio slows down with many brush regions); page k of every image goes to
     the round's page-k project, at most `max_pages_per_image` pages, the lowest-ranked rest is dropped
     (counted). With the verifier choosing and `complete_below` set, an image whose prefills leave at most that
     share of its object-like area uncovered (model/verifier.py `uncovered_objectness`, SAM 3's exhaustivity
     check) is complete: it skips steps 2-4, its prefills are written as `verifier_accepted` (unverified until
     their audit passes or a reviewer accepts them). In simulation the plan also scores today's thresholds, the
     verifier and both side by side on the round's candidates (`compare_triage`; the report's table).
     The plan is saved before anything is imported, so a rerun imports the same prefills.
  2. Publish: each page's prefills as one prediction per task (one brush region labelled "prefill" per mask,
     `model_version` = the round's model).
  3. Review or wait, by the reviewer the stage is given: `SimulatedReview` (simulated annotators,
     engine/integrations/prefill_review.py, accept, fix or delete the prefills and, on an image's last page,
     click the objects no kept mask covers) or `PeopleReview` (the stage waits for people in Label Studio).
  4. Pull with lineage (`lineage_of`): a region that kept a prefill's id and mask is prefill_accepted, one that
     kept the id but changed is prefill_edited (with prefill_iou), a new region is manual_added; prefills
     missing from the annotation were deleted (rejections).
  5. Audit: a random `audit_fraction` of accepted prefills is checked against the truth (simulated mode; for
     people, `audit.json` lists the reviewer queue); a failed audit marks the mask unverified.
  6. Write every final mask (upserts keyed by image, round, region: re-running replaces, never duplicates).
  7. Summarise.

Precision in the summary: `prefill_precision` is the measured estimate a person-run round also gets
(accepted prefills right at the audit's pass rate, edited ones right when prefill_iou >= precision_iou,
deleted ones wrong, duplicates included); `prefill_precision_true` (simulation only) checks every prefill
against the truth by calibration's measure (best IoU to any true mask), so a duplicate counts as right there.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.integrations import labelling, runtime
from engine.integrations.annotator import SimulatedAnnotator, objects_in_frame
from storage.coco import GTObject
from engine.integrations.config import EngineConfig
from engine.integrations.labelling import at_full_size, region_effort
from engine.integrations.labelstudio import LabelStudio, PrefillMask, PullResult, TaskImage
from engine.integrations.ml_backend import precompute_embeddings
from engine.integrations.prefill_review import (
    ImageReview,
    PrefillReviewer,
    ReviewPolicy,
    choose_audit,
    prefill_precision,
)
from model.amg import generate_with_fallback
from model.calibration import (Thresholds, best_match_iou, choose_thresholds, fit_verifier, generator_params,
                               history_samples)
from model.verifier import mask_features, triage_at_budget, uncovered_objectness
from model.iou import mask_iou
from model.segmenter import failure_kind
from storage.images import BadImage
from storage.records import MaskRecord, make_mask_id
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



# --------------------------------------------------------------------------- lineage

@dataclass
class Lineage:
    """origin: prefill_accepted | prefill_edited | manual_added | verifier_accepted (a complete image's prefill,
    no person saw it); prefill_region: the prefill it came from;
    prefill_iou: IoU between that prefill and the final mask (edited ones)."""

    origin: str
    prefill_region: str | None = None
    prefill_iou: float | None = None


def lineage_of(region_id: str, mask: np.ndarray, prefill_masks: dict[str, np.ndarray]) -> Lineage:
    """Where a final region came from. Label Studio keeps a prediction region's id when an annotator
    accepts or edits it, so the id says whether it started as a prefill and the mask says whether it
    changed. mask: (H, W) bool; prefill_masks: region id -> (H, W) bool of the task's prefills."""
    before = prefill_masks.get(region_id)
    if before is None:
        return Lineage("manual_added")
    if before.shape == mask.shape and np.array_equal(before, mask):
        return Lineage("prefill_accepted", region_id)
    return Lineage("prefill_edited", region_id, float(mask_iou(before, mask)) if before.shape == mask.shape else 0.0)



# --------------------------------------------------------------------------- records

def final_record(image_id: str, round: int, model_version: str | None, region_id: str, mask: np.ndarray,
                 lineage: Lineage, prefill: Prefill | None, annotator: str | None, source: dict,
                 clicks: int | None, lead_time_s: float | None, verified: bool = True) -> MaskRecord:
    """One final mask of a semi-automatic task. mask: (H, W) bool in pixels of the stored image. The id is
    stable in (image, round, region), so a re-pull replaces the mask instead of adding another."""
    return MaskRecord.from_rle(
        image_id, make_mask_id(image_id, STAGE, round, region_id), encode_masks(mask[None])[0], STAGE, round,
        model_version=model_version, origin=lineage.origin,
        predicted_iou=prefill.predicted_iou if prefill else None,
        stability_score=prefill.stability_score if prefill else None,
        point_coords=prefill.point_coords if prefill else [],
        crop_box=prefill.crop_box if prefill else None,
        annotator=annotator, verified=verified, source=source, clicks=clicks, lead_time_s=lead_time_s,
        prefill_iou=lineage.prefill_iou, verifier_version=prefill.verifier_version if prefill else None,
        verifier_score=prefill.verifier_score if prefill else None)



# --------------------------------------------------------------------------- summary

@dataclass
class RoundTally:
    """Counts of one semi round, for the summary."""

    images: int = 0
    prefills: int = 0
    dropped_by_cap: int = 0
    accepted: int = 0
    edited: int = 0
    rejected: int = 0
    added: int = 0
    added_clicks: int = 0
    final_masks: int = 0
    lead_time_s: float = 0.0
    edited_prefill_ious: list[float] = field(default_factory=list)
    audit_total: int = 0
    audit_passed: int = 0
    true_right: int = 0  # simulated mode: prefills whose IoU to the truth reaches precision_iou
    true_known: int = 0

    def summary(self, precision_iou: float) -> dict:
        n = self.prefills
        share = (lambda k: round(k / n, 4) if n else None)
        estimate = prefill_precision(n, self.accepted, self.audit_passed, self.audit_total,
                                     self.edited_prefill_ious, precision_iou)
        return {
            "images": self.images,
            "masks": self.final_masks,
            "masks_per_image": round(self.final_masks / self.images, 3) if self.images else 0.0,
            "masks_per_image_before": round(n / self.images, 3) if self.images else 0.0,
            "masks_per_image_after": round(self.final_masks / self.images, 3) if self.images else 0.0,
            "prefills": n,
            "prefill_dropped_by_cap": self.dropped_by_cap,
            "prefill_accepted": share(self.accepted),
            "prefill_edited": share(self.edited),
            "prefill_rejected": share(self.rejected),
            "prefill_counts": {"accepted": self.accepted, "edited": self.edited, "rejected": self.rejected},
            "manual_added": self.added,
            "clicks_per_added_mask": round(self.added_clicks / self.added, 3) if self.added else None,
            "seconds_per_mask": round(self.lead_time_s / self.final_masks, 3) if self.final_masks else None,
            "prefill_precision": None if estimate is None else round(estimate, 4),
            "audit": {"audited": self.audit_total, "passed": self.audit_passed},
            "prefill_precision_true": round(self.true_right / self.true_known, 4) if self.true_known else None,
        }



@dataclass
class SemiSummary:
    """What one semi round did. Shares are of all prefills; prefill_counts: accepted, edited, rejected;
    audit: audited, passed; thresholds: model/calibration.py's Thresholds as a dict; ls_project_ids: page ->
    Label Studio project id."""

    round: int
    images: int
    masks: int
    masks_per_image: float
    masks_per_image_before: float
    masks_per_image_after: float
    prefills: int
    prefill_dropped_by_cap: int
    prefill_accepted: float | None
    prefill_edited: float | None
    prefill_rejected: float | None
    prefill_counts: dict
    manual_added: int
    clicks_per_added_mask: float | None
    seconds_per_mask: float | None
    prefill_precision: float | None
    audit: dict
    prefill_precision_true: float | None
    target_precision: float
    precision_iou: float
    thresholds: dict
    history_samples: int
    pages: int
    triage_comparison: dict | None  # simulation: thresholds / verifier / both on the round's candidates (compare_triage)
    triage: str  # what chose the prefills: thresholds | verifier | both (stages.semi.triage, or thresholds as fallback)
    verifier: dict | None  # the verifier's version, score threshold, reached, history size, reason
    completed: dict  # images the exhaustivity estimate finished without people (completed_summary)
    ls_project_id: int | None  # None: every image was complete, nothing went to Label Studio
    ls_project_ids: dict
    ls_url: str | None
    model_version: str
    written: int
    problems: int
    simulated: bool
    wall_s: float
    stage: str = STAGE

    def to_dict(self) -> dict:
        return asdict(self)


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


# --------------------------------------------------------------------------- step 2: publish

def publish_pages(ls: LabelStudio, cfg: EngineConfig, round: int, pages: Pages, plan: dict,
                  model_version: str) -> None:
    """One project per page; page k holds the images with at least k pages, each task with its page's prefills."""
    thr = plan["thresholds"]
    for page in range(1, pages.n_pages + 1):
        page_images = [im for i, im in pages.images.items() if pages.last_page[i] >= page]
        prefills = {i: [PrefillMask(mask=pages.masks[i][p.region_id], score=p.predicted_iou, region_id=p.region_id)
                        for p in pages.on_page(i, page)] for i in pages.images}
        pages.projects[page], pages.tasks[page] = labelling.publish(
            ls, cfg, labelling.project_title(cfg, STAGE, round, page),
            f"semi-automatic round {round}, page {page} of prefills, model {model_version}; "
            f"thresholds {thr['pred_iou_thresh']:.3f}/{thr['stability_score_thresh']:.3f}",
            page_images, prefills, model_version=model_version)


# --------------------------------------------------------------------------- step 3: review (simulated)

def review_pages(ls: LabelStudio, cfg: EngineConfig, pages: Pages, backend_ids: dict[int, int],
                 truth: dict[str, list[GTObject]]) -> None:
    """Simulated annotators review every page in order; an image's last page adds what is missing."""
    s = cfg.simulate
    policy = ReviewPolicy(s.review_accept_iou, s.review_edit_iou, s.cover_iou)
    states = {i: ImageReview() for i in pages.images}
    for page, pid in pages.projects.items():
        reviewer = PrefillReviewer(SimulatedAnnotator(ls, backend_ids[page], settings=runtime.annotator_settings(cfg)),
                                   policy, s.seconds_per_review)
        done = ls.annotated_task_ids(pid)
        for image_id, task_id in pages.tasks[page].items():
            if task_id in done:
                continue  # a resumed round: submitted before
            page_ps = [(p.region_id, pages.masks[image_id][p.region_id]) for p in pages.on_page(image_id, page)]
            reviewer.review_task(task_id, pages.images[image_id], page_ps, truth.get(image_id, []),
                                 states[image_id], add_missing=page == pages.last_page[image_id])


# --------------------------------------------------------------------------- step 4: pull with lineage

def records_from_pulls(pulls: dict[int, PullResult], pages: Pages, round: int, model_version: str,
                       tally: RoundTally) -> tuple[list[MaskRecord], list[int]]:
    """Every final region of every page's latest annotation as a MaskRecord with its lineage; counts go to
    `tally`. Returns (records, indices of the accepted prefills among them)."""
    records: list[MaskRecord] = []
    accepted: list[int] = []
    prefill_by_region = {i: {p.region_id: p for p in ps} for i, ps in pages.prefills.items()}
    for page, pull in pulls.items():
        latest = {}
        for ann in pull.annotations:  # the latest submitted annotation of each task wins
            if ann.image_id in pages.images and (ann.task_id not in latest
                                                 or (ann.updated_at or "") >= (latest[ann.task_id].updated_at or "")):
                latest[ann.task_id] = ann
        for ann in latest.values():
            page_prefill_ids = {p.region_id for p in pages.on_page(ann.image_id, page)}
            masks_here = {rid: pages.masks[ann.image_id][rid] for rid in page_prefill_ids}
            kept_ids = set()
            for r in ann.regions:
                lin = lineage_of(r.region_id, r.mask, masks_here)
                if lin.prefill_region is not None:
                    if lin.prefill_region in kept_ids:
                        lin = Lineage("manual_added")  # a second region with the same id: not the prefill
                    kept_ids.add(lin.prefill_region or "")
                pre = prefill_by_region[ann.image_id].get(lin.prefill_region) if lin.prefill_region else None
                clicks, seconds = region_effort(ann, r)
                source = {"ls_project": pages.projects[page], "ls_task": ann.task_id,
                          "ls_annotation": ann.annotation_id, "ls_region": r.region_id,
                          "ls_updated_at": ann.updated_at, "page": page, **({"unsure": True} if r.unsure else {})}
                if lin.origin == "prefill_accepted":
                    tally.accepted += 1
                    accepted.append(len(records))
                elif lin.origin == "prefill_edited":
                    tally.edited += 1
                    tally.edited_prefill_ious.append(float(lin.prefill_iou))
                else:
                    tally.added += 1
                    tally.added_clicks += int(clicks or 0)
                tally.lead_time_s += float(seconds or 0.0)
                mask = at_full_size(r.mask, pages.full_sizes.get(ann.image_id, r.mask.shape))
                records.append(final_record(ann.image_id, round, model_version, r.region_id, mask, lin, pre,
                                            ann.annotator, source, clicks, seconds))
            tally.rejected += len(page_prefill_ids - kept_ids)
    return records, accepted


def completed_records(plan: dict, image_ids: list[str], round: int, model_version: str) -> list[MaskRecord]:
    """The prefills of the images the verifier judged complete (`stages.semi.complete_below`), as final masks
    nobody looked at: origin verifier_accepted, unverified (training reads verified masks only) until their
    audit passes or a reviewer accepts them (stages/review.py), at the image file's size."""
    records = []
    for image_id in image_ids:
        im = plan["images"][image_id]
        size = tuple(im.get("original_size") or (im["height"], im["width"]))
        ps = [Prefill.from_json(p) for p in im["prefills"]]
        for p, mask in zip(ps, decode_rles([p.rle for p in ps])):
            records.append(final_record(image_id, round, model_version, p.region_id, at_full_size(mask, size),
                                        Lineage("verifier_accepted", p.region_id), p, None,
                                        {"verifier_triage": "complete", "uncovered": im["uncovered"]}, None, None,
                                        verified=False))
    return records


def completed_summary(plan: dict, completed: list[str], tally: RoundTally, complete_below: float | None) -> dict:
    """What the exhaustivity estimate decided: images complete without people, their masks, their audit and
    (simulation) their masks' precision against the truth."""
    return {"complete_below": complete_below, "images": len(completed), "images_to_people": len(plan["images"]) -
            len(completed), "masks": tally.final_masks, "audit": {"audited": tally.audit_total,
                                                                  "passed": tally.audit_passed},
            "precision_true": round(tally.true_right / tally.true_known, 4) if tally.true_known else None}


# --------------------------------------------------------------------------- step 5: audit

def audit_accepted(cfg: EngineConfig, round: int, records: list[MaskRecord], accepted: list[int],
                   truth: dict[str, list[GTObject]] | None, tally: RoundTally, salt: int = 6) -> list[dict]:
    """Check a random `audit_fraction` of the accepted prefills against the truth (when known): a mask that
    fails its audit is no longer trusted as verified. Returns the audit rows (the reviewer queue)."""
    s = cfg.stages.semi
    rng = np.random.default_rng([cfg.seed, round, salt])
    rows = []
    for idx in (accepted[k] for k in choose_audit(len(accepted), s.audit_fraction, rng)):
        rec = records[idx]
        row = {"mask_id": rec.mask_id, "image_id": rec.image_id, **rec.source}
        if truth is not None:
            iou = _best_iou(decode_rles([rec.rle])[0], [o.mask for o in truth.get(rec.image_id, [])])
            passed = iou >= s.precision_iou
            rec.source = {**rec.source, "audit": {"iou": float(f"{iou:.4f}"), "passed": passed}}
            rec.verified = passed  # (a complete image's mask: verified by the audit, else by nobody yet)
            tally.audit_total += 1
            tally.audit_passed += int(passed)
            row.update(iou=float(f"{iou:.4f}"), passed=passed)
        else:  # people: nobody has checked it yet; the review queue (stages/review.py) sends it to a reviewer
            rec.source = {**rec.source, "audit": {"pending": True}}
        rows.append(row)
    return rows


def true_precision(pages: Pages, image_ids: set[str], truth: dict[str, list[GTObject]], precision_iou: float,
                   tally: RoundTally) -> None:
    """What the audit estimates, measured on every prefill of the reviewed images (simulation only)."""
    for image_id in image_ids:
        ps = pages.prefills.get(image_id) or []
        if not ps:
            continue
        frame = next(iter(pages.masks[image_id].values())).shape  # the task's frame, where prefills live
        gt = [o.mask for o in objects_in_frame(truth.get(image_id, []), *frame)]
        tally.true_known += len(ps)
        tally.true_right += int(sum(_best_iou(pages.masks[image_id][p.region_id], gt) >= precision_iou for p in ps))


def _best_iou(mask: np.ndarray, truth: list[np.ndarray]) -> float:
    return max((float(mask_iou(mask, t)) for t in truth if t.shape == mask.shape), default=0.0)


# --------------------------------------------------------------------------- step 6: write

def write_final(store, records: list[MaskRecord], round: int, model_version: str) -> int:
    """Upsert the final masks and mark their images done for this round (one commit). Returns masks written."""
    if not records:
        return 0
    store.upsert(records, stage=STAGE, round=round, model_version=model_version)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.image_id] = counts.get(r.image_id, 0) + 1
    with store.writer(stage=STAGE, round=round, model_version=model_version) as w:
        for image_id, n in sorted(counts.items()):
            w.image_done(image_id, n)
        w.commit()
    return len(records)


# --------------------------------------------------------------------------- who reviews the pages (step 3)

class PeopleReview:
    """People review the pages in Label Studio: the stage waits until every task has an annotation (Ctrl-C pulls
    what is there). No truth: the audit queues its masks for a reviewer."""

    truth = None
    simulated = False

    def __init__(self, poll_s: float = 30.0):
        self.poll_s = poll_s

    def review(self, ls: LabelStudio, cfg: EngineConfig, pages: Pages, backend_ids: dict[int, int], round: int,
               server) -> None:
        labelling.wait_for_people(
            ls, {pid: len(pages.tasks[page]) for page, pid in pages.projects.items()}, self.poll_s,
            f"Label Studio: {len(pages.projects)} semi round {round} project(s) at {ls.url}/projects/"
            f"{pages.projects[1]}: waiting for annotations (Ctrl-C to pull now)", labelling.login_line(cfg, server))


class SimulatedReview:
    """Simulated annotators review the pages through the real Label Studio API (`review_pages`), knowing the
    truth; the audit and the true precision are checked against it."""

    simulated = True

    def __init__(self, truth: dict[str, list[GTObject]]):
        self.truth = truth

    def review(self, ls: LabelStudio, cfg: EngineConfig, pages: Pages, backend_ids: dict[int, int], round: int,
               server) -> None:
        review_pages(ls, cfg, pages, backend_ids, self.truth)


# --------------------------------------------------------------------------- the stage

def run_semi_stage(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str] | None = None,
                   simulate: bool = True, poll_s: float = 30.0,
                   reviewer: "PeopleReview | SimulatedReview | None" = None) -> SemiSummary:
    """One semi-automatic round (steps: module doc). image_ids None: the first `images_per_round` images of
    the source that no manual or semi round has done yet. reviewer: who does step 3 (default: simulated
    annotators with `images.ground_truth` when `simulate`, else people in Label Studio, polled every poll_s)."""
    t0 = time.monotonic()
    s = cfg.stages.semi
    reviewer = reviewer or (SimulatedReview(runtime.ground_truth(cfg)) if simulate else PeopleReview(poll_s))
    store, quarantine, source = runtime.mask_store(cfg), runtime.quarantine(cfg), runtime.image_source(cfg)
    if image_ids is None:
        done = store.images_done("manual") | store.images_done(STAGE)
        image_ids = [r.image_id for r in source.list() if r.image_id not in done][: s.images_per_round]
    segmenter = runtime.segmenter(cfg, checkpoint)
    version = segmenter.model_version

    # 1. Plan (once per round: a rerun reuses the saved plan); images the verifier judged complete skip people
    plan = saved_or_new_plan(cfg, round, segmenter, store, source, image_ids, quarantine, reviewer.truth)
    completed = [i for i, im in plan["images"].items() if im.get("complete")]
    pages = Pages.from_plan(plan, [i for i in plan["images"] if i not in completed])
    # 2-4. Publish, review, pull (every image complete: nothing for people, no Label Studio)
    pulls, ls_url, problems = publish_review_pull(cfg, round, checkpoint, segmenter, source, quarantine, plan,
                                                  pages, reviewer) if pages.prefills else ({}, None, 0)
    tally = RoundTally(images=len(pages.images))
    records, accepted = records_from_pulls(pulls, pages, round, version, tally)
    reviewed = {r.image_id for r in records} | {a.image_id for p in pulls.values() for a in p.annotations}
    tally.prefills = sum(len(pages.prefills[i]) for i in reviewed if i in pages.prefills)
    tally.dropped_by_cap = sum(im["dropped_by_cap"] for i, im in plan["images"].items() if i not in completed)
    tally.final_masks = len(records)
    done_by_verifier = completed_records(plan, completed, round, version)

    # 5. Audit (people's accepted prefills, and apart from them the complete images' masks)
    done_tally = audit_round(cfg, round, records, accepted, done_by_verifier, len(completed), pages, reviewed,
                             reviewer.truth, tally)

    # 6. Write
    written = write_final(store, records + done_by_verifier, round, version)

    # 7. Summarise
    summary = SemiSummary(
        round=round, **tally.summary(s.precision_iou), target_precision=s.target_precision,
        precision_iou=s.precision_iou, thresholds=plan["thresholds"], history_samples=plan["history_samples"],
        pages=pages.n_pages if pages.prefills else 0, triage=plan.get("triage", "thresholds"),
        triage_comparison=plan.get("triage_comparison"), verifier=plan.get("verifier"),
        completed=completed_summary(plan, completed, done_tally, s.complete_below),
        ls_project_id=pages.projects.get(1), ls_project_ids=dict(pages.projects), ls_url=ls_url,
        model_version=version, written=written, problems=problems, simulated=reviewer.simulated,
        wall_s=float(f"{time.monotonic() - t0:.1f}"))
    _atomic_write_json(round_dir(cfg, round) / "summary.json", summary.to_dict())
    return summary


def publish_review_pull(cfg: EngineConfig, round: int, checkpoint: str | None, segmenter, source, quarantine,
                        plan: dict, pages: Pages, reviewer) -> tuple[dict, str, int]:
    """Steps 2-4: publish the pages to Label Studio, serve the ML backend while `reviewer` works, pull every page
    (read before anything is written). Returns (pulls by page, Label Studio's URL, problems set aside)."""
    ls, server = labelling.connect(cfg)
    images, pixels, pages.full_sizes = labelling.task_images(cfg, source, list(pages.prefills), quarantine, STAGE)
    pages.images = {im.image_id: im for im in images}
    precompute_embeddings(segmenter, list(pixels.items()), cfg.path("embeddings"))
    publish_pages(ls, cfg, round, pages, plan, segmenter.model_version)
    with labelling.start_ml_backend(cfg, segmenter, source, ls.url, people=not reviewer.simulated,
                                    checkpoint=checkpoint) as backend:
        backend_ids = {page: labelling.connect_backend(ls, pid, backend) for page, pid in pages.projects.items()}
        reviewer.review(ls, cfg, pages, backend_ids, round, server)
    pulls, problems = {page: ls.pull(pid) for page, pid in pages.projects.items()}, 0
    for page, pull in pulls.items():
        for thing, reason in pull.problems:
            quarantine.add(f"labelstudio project {pages.projects[page]} {thing}", reason, STAGE)
            problems += 1
    return pulls, ls.url, problems


def audit_round(cfg: EngineConfig, round: int, records: list, accepted: list, done_by_verifier: list,
                n_completed: int, pages: Pages, reviewed: set, truth: dict[str, list[GTObject]] | None,
                tally: RoundTally) -> RoundTally:
    """Step 5: audit people's accepted prefills and, apart from them, the complete images' masks (against the truth
    when known, else queued for a reviewer in audit.json); with the truth, the true precision too. Returns the
    complete images' tally."""
    s = cfg.stages.semi
    audit_rows = audit_accepted(cfg, round, records, accepted, truth, tally)
    done_tally = RoundTally(images=n_completed, final_masks=len(done_by_verifier))
    audit_rows += audit_accepted(cfg, round, done_by_verifier, list(range(len(done_by_verifier))), truth,
                                 done_tally, salt=7)
    _atomic_write_json(round_dir(cfg, round) / AUDIT_FILE, {
        "round": round, "audit_fraction": s.audit_fraction, "masks": audit_rows,
        "status": "checked against truth" if truth is not None else "pending: reviewer queue"})
    if truth is not None:
        true_precision(pages, reviewed, truth, s.precision_iou, tally)
        done_tally.true_known = len(done_by_verifier)
        done_tally.true_right = sum(_best_iou(decode_rles([r.rle])[0], [o.mask for o in truth.get(r.image_id, [])])
                                    >= s.precision_iou for r in done_by_verifier)
    return done_tally
