"""Stage 2, semi-automatic: the model pre-fills what it is sure of, annotators add what it missed.

`run_semi_stage(cfg, round, checkpoint, image_ids, simulate)`:
  1. Calibrate (model/calibration.py): re-run the current model's automatic generator with loose filters on
     the verified images of earlier rounds, match its masks to the verified ones, and choose the loosest
     (pred_iou_thresh, stability_thresh) whose precision lower bound reaches `target_precision`; with too
     little history, the stated defaults.
  2. Generate with those thresholds on the round's images; the confident masks, ranked by predicted IoU
     (then stability), are cut into pages of at most `max_prefill_per_task` (Label Studio slows down with
     many brush regions); page k of every image goes to the round's page-k project, at most
     `max_pages_per_image` pages, the lowest-ranked rest is dropped (counted). An image with nothing
     confident is a plain task. The plan (thresholds and prefills) is saved before anything is imported,
     so a rerun imports the same prefills and Label Studio's import stays idempotent.
  3. Each page's prefills are imported as one prediction (one brush region labelled "prefill" per mask,
     `model_version` = the round's model). Simulated annotators (engine/prefill_review.py) accept, fix or
     delete them and, on an image's last page, click the objects no kept mask covers.
  4. Pull (snapshot export) and write every final mask with lineage (`lineage_of`): a region that kept a
     prefill's id and mask is prefill_accepted, one that kept the id but changed is prefill_edited (with
     prefill_iou), a new region is manual_added; prefills missing from the annotation were deleted
     (rejections). A random `audit_fraction` of accepted prefills is checked against the truth (simulated
     mode; for people, `audit.json` lists the reviewer queue); a failed audit marks the mask unverified.
Writes are upserts keyed by (image, round, region): re-running or re-pulling replaces, never duplicates.

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

from engine.config import EngineConfig
from model.calibration import CalibrationSamples, Thresholds, best_match_iou, choose_thresholds
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_masks, rle_area, rle_bbox

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
            and m.stability_score >= thresholds.stability_thresh]
    return sorted(keep, key=lambda m: (-m.predicted_iou, -m.stability_score))


def paginate(n: int, per_page: int, max_pages: int) -> tuple[list[range], int]:
    """Cut n ranked items into pages of at most `per_page`, at most `max_pages` pages.
    Returns (pages as index ranges, number dropped beyond the last page)."""
    if per_page < 1 or max_pages < 1:
        raise ValueError(f"paging: per_page ({per_page}) and max_pages ({max_pages}) must be >= 1")
    pages = [range(s, min(s + per_page, n)) for s in range(0, min(n, per_page * max_pages), per_page)]
    return pages, max(0, n - per_page * max_pages)


def plan_prefills(masks: list, thresholds: Thresholds, per_page: int, max_pages: int) -> tuple[list[Prefill], int]:
    """Generated masks of one image -> its prefills (ranked, paged) and how many confident ones were dropped."""
    ranked = rank_confident(masks, thresholds)
    pages, dropped = paginate(len(ranked), per_page, max_pages)
    out = []
    for page_no, idx in enumerate(pages, start=1):
        for i in idx:
            m = ranked[i]
            out.append(Prefill(region_id=f"prefill-{i}", page=page_no, rle=m.rle,
                               predicted_iou=float(m.predicted_iou), stability_score=float(m.stability_score),
                               point_coords=[list(map(float, p)) for p in m.point_coords],
                               crop_box=[float(v) for v in m.crop_box]))
    return out, dropped


# --------------------------------------------------------------------------- lineage

@dataclass
class Lineage:
    """origin: prefill_accepted | prefill_edited | manual_added; prefill_region: the prefill it came from;
    prefill_iou: IoU between that prefill and the final mask (edited ones)."""

    origin: str
    prefill_region: str | None = None
    prefill_iou: float | None = None


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (H, W) bool masks (1.0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 1.0


def lineage_of(region_id: str, mask: np.ndarray, prefill_masks: dict[str, np.ndarray]) -> Lineage:
    """Where a final region came from. Label Studio keeps a prediction region's id when an annotator
    accepts or edits it, so the id says whether it started as a prefill and the mask says whether it
    changed. mask: (H, W) bool; prefill_masks: region id -> (H, W) bool of the task's prefills."""
    before = prefill_masks.get(region_id)
    if before is None:
        return Lineage("manual_added")
    if before.shape == mask.shape and np.array_equal(before, mask):
        return Lineage("prefill_accepted", region_id)
    return Lineage("prefill_edited", region_id, mask_iou(before, mask) if before.shape == mask.shape else 0.0)


# --------------------------------------------------------------------------- calibration history

def history_images(store, round: int, limit: int) -> list[str]:
    """Image ids with verified masks from rounds before `round`, newest round first, at most `limit`."""
    if round <= 0 or limit <= 0:
        return []
    table = store.read_table(columns=["image_id", "round"], verified=True, round=(0, round - 1))
    latest: dict[str, int] = {}
    for image_id, r in zip(table.column("image_id").to_pylist(), table.column("round").to_pylist()):
        latest[image_id] = max(r, latest.get(image_id, r))
    return sorted(latest, key=lambda i: (-latest[i], i))[:limit]


def build_history(segmenter, store, source, round: int, params, limit: int,
                  on_problem=lambda thing, reason: None) -> CalibrationSamples:
    """Calibration samples (model/calibration.py): the generator (loose `params`) on the verified images of
    earlier rounds, each generated mask matched to that image's verified masks. Images that can't be
    loaded or whose verified masks have another size are reported and skipped."""
    from model.amg import generate_masks
    from storage.images import BadImage

    parts = []
    for image_id in history_images(store, round, limit):
        try:
            loaded = source.load(source.ref(image_id))
        except BadImage as e:
            on_problem(image_id, f"calibration image unreadable ({e})")
            continue
        h, w = loaded.pixels.shape[:2]
        truth = [r.rle for r in store.iter_records(image_ids=[image_id], verified=True, round=(0, round - 1))
                 if (r.height, r.width) == (h, w)]
        if not truth:
            on_problem(image_id, f"verified masks are not {w}x{h} (the image as loaded now)")
            continue
        masks = generate_masks(segmenter, loaded.pixels, params)
        if not masks:
            continue
        parts.append(CalibrationSamples(
            np.array([m.predicted_iou for m in masks], np.float64),
            np.array([m.stability_score for m in masks], np.float64),
            best_match_iou([m.rle for m in masks], truth)))
    return CalibrationSamples.concat(parts)


def calibrate(cfg: EngineConfig, samples: CalibrationSamples) -> Thresholds:
    s = cfg.stages.semi
    return choose_thresholds(samples, s.target_precision, s.precision_iou, s.default_pred_iou_thresh,
                             s.default_stability_thresh, min_samples=s.calibration_min_samples,
                             min_kept=s.calibration_min_kept, confidence=s.calibration_confidence)


# --------------------------------------------------------------------------- records

def final_record(image_id: str, round: int, model_version: str | None, region_id: str, mask: np.ndarray,
                 lineage: Lineage, prefill: Prefill | None, annotator: str | None, source: dict,
                 clicks: int | None, lead_time_s: float | None, verified: bool = True) -> MaskRecord:
    """One final mask of a semi-automatic task. mask: (H, W) bool in pixels of the stored image. The id is
    stable in (image, round, region), so a re-pull replaces the mask instead of adding another."""
    rle = encode_masks(mask[None])[0]
    h, w = mask.shape
    return MaskRecord(
        image_id=image_id, mask_id=make_mask_id(image_id, STAGE, round, region_id), height=h, width=w,
        rle=rle, area=int(rle_area([rle])[0]), bbox=[float(v) for v in rle_bbox([rle])[0]], stage=STAGE,
        round=round, model_version=model_version, origin=lineage.origin,
        predicted_iou=prefill.predicted_iou if prefill else None,
        stability_score=prefill.stability_score if prefill else None,
        point_coords=prefill.point_coords if prefill else [],
        crop_box=prefill.crop_box if prefill else None,
        annotator=annotator, verified=verified, source=source, clicks=clicks, lead_time_s=lead_time_s,
        prefill_iou=lineage.prefill_iou)


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
        from engine.prefill_review import prefill_precision

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


# --------------------------------------------------------------------------- files

def _atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def round_dir(cfg: EngineConfig, round: int) -> Path:
    return Path(cfg.workdir).resolve() / "semi" / f"round-{round}"


# --------------------------------------------------------------------------- the stage

def project_title(cfg: EngineConfig, round: int, page: int) -> str:
    """Unique per work dir, round and page, within Label Studio's 50-character title limit."""
    import hashlib

    workdir = Path(cfg.workdir).resolve()
    tag = hashlib.sha1(str(workdir).encode()).hexdigest()[:6]
    return f"semi r{round}{'' if page == 1 else f' p{page}'} {workdir.name[:24]} {tag}"


def make_plan(cfg: EngineConfig, round: int, segmenter, store, source, image_ids: list[str],
              quarantine) -> dict:
    """Calibrate, generate on the round's images and choose/page the prefills (the stage's steps 1–2).
    Returns the plan (JSON-able): model_version, thresholds, history size, per image its size, prefills
    and how many were generated / dropped by the cap."""
    from model.amg import AmgParams, generate_with_fallback
    from storage.images import BadImage

    s = cfg.stages.semi
    grid = {"points_per_side": s.points_per_side} if s.points_per_side else {}
    loose = AmgParams.from_config(cfg.stages.auto, pred_iou_thresh=s.calibration_pred_iou_floor,
                                  stability_score_thresh=s.calibration_stability_floor, **grid)
    samples = build_history(segmenter, store, source, round, loose, s.calibration_images,
                            on_problem=lambda thing, reason: quarantine.add(thing, reason, STAGE))
    thresholds = calibrate(cfg, samples)
    # The generator keeps pred_iou > thresh; calibration means >=: ask for a hair less, re-filter exactly.
    strict = AmgParams.from_config(cfg.stages.auto, pred_iou_thresh=max(0.0, thresholds.pred_iou_thresh - 1e-6),
                                   stability_score_thresh=thresholds.stability_thresh, **grid)
    images = {}
    for image_id in image_ids:
        ref = source.ref(image_id)
        try:
            loaded = source.load(ref)
            masks, scale = generate_with_fallback(segmenter, loaded.pixels, strict)
        except BadImage as e:
            quarantine.add(ref.uri, str(e), STAGE)
            continue
        except (RuntimeError, MemoryError) as e:
            quarantine.add(ref.uri, f"automatic generator failed at every scale ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]})", STAGE)
            continue
        prefills, dropped = plan_prefills(masks, thresholds, s.max_prefill_per_task, s.max_pages_per_image)
        h, w = loaded.pixels.shape[:2]
        images[image_id] = {"height": h, "width": w, "generated": len(masks),
                            "confident": len(prefills) + dropped, "dropped_by_cap": dropped,
                            "prefills": [p.to_json() for p in prefills]}
    return {"round": round, "model_version": segmenter.model_version, "thresholds": thresholds.to_dict(),
            "history_samples": len(samples), "image_ids": list(image_ids), "images": images}


def run_semi_stage(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str] | None = None,
                   simulate: bool = True, poll_s: float = 30.0) -> dict:
    """One semi-automatic round (steps: module doc). image_ids None: the first `images_per_round` images of
    the source that no manual or semi round has done yet. simulate=False: import and serve, wait until
    every task has an annotation (Ctrl-C pulls what is there), then pull. Returns the stage summary."""
    from engine.annotator import AnnotatorSettings, SimulatedAnnotator, load_ground_truth
    from engine.labelstudio import LabelStudioError, PrefillMask
    from engine.ml_backend import BASIC_USER, precompute_embeddings
    from engine.prefill_review import ImageReview, PrefillReviewer, ReviewPolicy
    from stages.manual import allow_serving, connect, image_source, load_segmenter, start_backend, task_images
    from storage.quarantine import Quarantine
    from storage.rle import decode_rles
    from storage.shards import MaskStore

    t0 = time.monotonic()
    s, m = cfg.stages.semi, cfg.stages.manual
    store = MaskStore(cfg.path(cfg.storage.root), s3_endpoint_url=cfg.storage.s3_endpoint_url,
                      shard_target_mb=cfg.storage.shard_target_mb, s3_region=cfg.storage.s3_region)
    quarantine = Quarantine(cfg.path(cfg.storage.root), s3_endpoint_url=cfg.storage.s3_endpoint_url)
    source = image_source(cfg)
    if image_ids is None:
        done = store.images_done("manual") | store.images_done(STAGE)
        image_ids = [r.image_id for r in source.list() if r.image_id not in done][: s.images_per_round]
    segmenter = load_segmenter(cfg, checkpoint)
    truth = None
    if simulate:
        if not cfg.images.ground_truth:
            raise LabelStudioError("stages.simulate needs images.ground_truth (COCO JSON)")
        truth = load_ground_truth(cfg.path(cfg.images.ground_truth))

    # Steps 1–2, once per round: a rerun reuses the saved plan (same prefills, same region ids).
    rdir = round_dir(cfg, round)
    plan_path = rdir / PLAN_FILE
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if plan is None or plan.get("model_version") != segmenter.model_version or plan.get("image_ids") != list(image_ids):
        plan = make_plan(cfg, round, segmenter, store, source, image_ids, quarantine)
        _atomic_write_json(plan_path, plan)
    prefills = {i: [Prefill.from_json(p) for p in im["prefills"]] for i, im in plan["images"].items()}
    n_pages = max([1] + [p.page for ps in prefills.values() for p in ps])

    # Step 3: one project per page; page k holds the images with at least k pages.
    ls, _info = connect(cfg)
    images, pixels = task_images(cfg, source, list(plan["images"]), quarantine)
    by_id = {im.image_id: im for im in images}
    precompute_embeddings(segmenter, list(pixels.items()), cfg.path("embeddings"))
    last_page = {i: max([1] + [p.page for p in ps]) for i, ps in prefills.items()}
    projects: dict[int, int] = {}
    tasks: dict[int, dict[str, int]] = {}
    prefill_masks: dict[str, dict[str, np.ndarray]] = {}
    for image_id, ps in prefills.items():
        decoded = decode_rles([p.rle for p in ps]) if ps else []
        prefill_masks[image_id] = {p.region_id: d for p, d in zip(ps, decoded)}
    for page in range(1, n_pages + 1):
        page_images = [by_id[i] for i in by_id if last_page[i] >= page]
        pid = ls.ensure_project(project_title(cfg, round, page), description=(
            f"semi-automatic round {round}, page {page} of prefills, model {segmenter.model_version}; "
            f"thresholds {plan['thresholds']['pred_iou_thresh']:.3f}/{plan['thresholds']['stability_thresh']:.3f}"))
        allow_serving(ls, pid, page_images, Path(cfg.workdir).resolve())
        page_prefills = {i: [PrefillMask(mask=prefill_masks[i][p.region_id], score=p.predicted_iou,
                                         region_id=p.region_id) for p in prefills[i] if p.page == page]
                         for i in by_id}
        projects[page] = pid
        tasks[page] = ls.import_tasks(pid, page_images, page_prefills, model_version=segmenter.model_version)

    with start_backend(cfg, segmenter, source) as backend:
        backend_ids = {page: ls.connect_ml_backend(pid, backend.url, BASIC_USER, backend.state.token)
                       for page, pid in projects.items()}
        if simulate:
            settings = AnnotatorSettings(max_clicks=m.max_clicks, iou_target=m.iou_target,
                                         seconds_per_click=m.seconds_per_click, seconds_per_mask=m.seconds_per_mask,
                                         image_time_limit_s=m.image_time_limit_s)
            policy = ReviewPolicy(s.review_accept_iou, s.review_edit_iou, s.cover_iou)
            states = {i: ImageReview() for i in by_id}
            for page, pid in projects.items():  # pages in order: an image's last page adds what is missing
                reviewer = PrefillReviewer(SimulatedAnnotator(ls, backend_ids[page], settings=settings),
                                           policy, s.seconds_per_review)
                done = ls.annotated_task_ids(pid)
                for image_id, task_id in tasks[page].items():
                    if task_id in done:
                        continue  # a resumed round: submitted before
                    page_ps = [(p.region_id, prefill_masks[image_id][p.region_id])
                               for p in prefills[image_id] if p.page == page]
                    reviewer.review_task(task_id, by_id[image_id], page_ps, truth.get(image_id, []),
                                         states[image_id], add_missing=page == last_page[image_id])
        else:
            print(f"Label Studio: {len(projects)} semi round {round} project(s) at {ls.url}/projects/"
                  f"{projects[1]}: waiting for annotations (Ctrl-C to pull now)", flush=True)
            try:
                while any(len(ls.annotated_task_ids(pid)) < len(tasks[pg]) for pg, pid in projects.items()):
                    time.sleep(poll_s)
            except KeyboardInterrupt:
                pass

    # Step 4: pull every page (all read before anything is written), lineage, audit, write.
    pulls = {page: ls.pull(pid) for page, pid in projects.items()}
    tally = RoundTally(images=len(by_id))
    prefill_by_region = {i: {p.region_id: p for p in ps} for i, ps in prefills.items()}
    records: list[MaskRecord] = []
    accepted_idx: list[int] = []
    problems = 0
    for page, pull in pulls.items():
        for thing, reason in pull.problems:
            quarantine.add(f"labelstudio project {projects[page]} {thing}", reason, STAGE)
            problems += 1
        latest = {}
        for ann in pull.annotations:  # the latest submitted annotation of each task wins
            if ann.image_id in by_id and (ann.task_id not in latest
                                          or (ann.updated_at or "") >= (latest[ann.task_id].updated_at or "")):
                latest[ann.task_id] = ann
        for ann in latest.values():
            page_prefill_ids = {p.region_id for p in prefills[ann.image_id] if p.page == page}
            masks_here = {rid: prefill_masks[ann.image_id][rid] for rid in page_prefill_ids}
            kept_ids = set()
            for r in ann.regions:
                lin = lineage_of(r.region_id, r.mask, masks_here)
                if lin.prefill_region is not None:
                    if lin.prefill_region in kept_ids:
                        lin = Lineage("manual_added")  # a second region with the same id: not the prefill
                    kept_ids.add(lin.prefill_region or "")
                pre = prefill_by_region[ann.image_id].get(lin.prefill_region) if lin.prefill_region else None
                clicks = r.meta.get("clicks")
                seconds = r.meta.get("lead_time_s")
                if seconds is None and ann.lead_time_s is not None and ann.regions:
                    seconds = float(ann.lead_time_s) / len(ann.regions)
                rec = final_record(ann.image_id, round, segmenter.model_version, r.region_id, r.mask, lin, pre,
                                   ann.annotator, {"ls_project": projects[page], "ls_task": ann.task_id,
                                                   "ls_annotation": ann.annotation_id, "ls_region": r.region_id,
                                                   "ls_updated_at": ann.updated_at, "page": page},
                                   None if clicks is None else int(clicks),
                                   None if seconds is None else float(seconds))
                if lin.origin == "prefill_accepted":
                    tally.accepted += 1
                    accepted_idx.append(len(records))
                elif lin.origin == "prefill_edited":
                    tally.edited += 1
                    tally.edited_prefill_ious.append(float(lin.prefill_iou))
                else:
                    tally.added += 1
                    tally.added_clicks += int(clicks or 0)
                tally.lead_time_s += float(seconds or 0.0)
                records.append(rec)
            tally.rejected += len(page_prefill_ids - kept_ids)
    reviewed_images = {r.image_id for r in records} | {a.image_id for p in pulls.values() for a in p.annotations}
    tally.prefills = sum(len(prefills[i]) for i in reviewed_images if i in prefills)
    tally.dropped_by_cap = sum(plan["images"][i]["dropped_by_cap"] for i in plan["images"])
    tally.final_masks = len(records)

    # The audit: a random share of accepted prefills checked against the truth.
    rng = np.random.default_rng([cfg.seed, round, 6])
    from engine.prefill_review import choose_audit

    audit = [accepted_idx[k] for k in choose_audit(len(accepted_idx), s.audit_fraction, rng)]
    audit_rows = []
    for idx in audit:
        rec = records[idx]
        row = {"mask_id": rec.mask_id, "image_id": rec.image_id, **rec.source}
        if truth is not None:
            iou = _truth_iou(rec, truth.get(rec.image_id, []))
            passed = iou >= s.precision_iou
            rec.source = {**rec.source, "audit": {"iou": float(f"{iou:.4f}"), "passed": passed}}
            rec.verified = passed  # a mask that failed its audit is not trusted as verified
            tally.audit_total += 1
            tally.audit_passed += int(passed)
            row.update(iou=float(f"{iou:.4f}"), passed=passed)
        audit_rows.append(row)
    _atomic_write_json(rdir / AUDIT_FILE, {"round": round, "audit_fraction": s.audit_fraction,
                                           "status": "checked against truth" if truth is not None
                                           else "pending: reviewer queue", "masks": audit_rows})
    if truth is not None:  # what the audit estimates, measured on every prefill (simulation only)
        for image_id in reviewed_images:
            ps = prefills.get(image_id) or []
            if ps:
                objs = truth.get(image_id, [])
                gt = [o.mask for o in objs]
                tally.true_known += len(ps)
                tally.true_right += int(sum(_best_iou(prefill_masks[image_id][p.region_id], gt) >= s.precision_iou
                                            for p in ps))

    written = 0
    if records:
        store.upsert(records, stage=STAGE, round=round, model_version=segmenter.model_version)
        written = len(records)
        counts: dict[str, int] = {}
        for r in records:
            counts[r.image_id] = counts.get(r.image_id, 0) + 1
        with store.writer(stage=STAGE, round=round, model_version=segmenter.model_version) as w:
            for image_id, n in sorted(counts.items()):
                w.image_done(image_id, n)
            w.commit()

    summary = {"stage": STAGE, "round": round, **tally.summary(s.precision_iou),
               "target_precision": s.target_precision, "precision_iou": s.precision_iou,
               "thresholds": plan["thresholds"], "history_samples": plan["history_samples"],
               "pages": n_pages, "ls_project_id": projects[1], "ls_project_ids": projects, "ls_url": ls.url,
               "model_version": segmenter.model_version, "written": written, "problems": problems,
               "simulated": simulate, "wall_s": float(f"{time.monotonic() - t0:.1f}")}
    _atomic_write_json(rdir / "summary.json", summary)
    return json.loads(json.dumps(summary, default=str))


def _best_iou(mask: np.ndarray, truth: list[np.ndarray]) -> float:
    return max((mask_iou(mask, t) for t in truth if t.shape == mask.shape), default=0.0)


def _truth_iou(rec: MaskRecord, objects: list) -> float:
    from storage.rle import decode_rles

    return _best_iou(decode_rles([rec.rle])[0], [o.mask for o in objects])
