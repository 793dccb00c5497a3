"""The semi-automatic stage's steps 2-6 below the entry: publish the pages, the simulated review, the pull with
lineage, the audit and the write (stages/semi/__init__.py: the stage)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from engine.integrations import labelling, runtime
from engine.integrations.annotator import SimulatedAnnotator, objects_in_frame
from storage.coco import GTObject
from engine.integrations.config import EngineConfig
from engine.integrations.labelling import at_full_size, region_effort
from engine.integrations.labelstudio import LabelStudio, PrefillMask, PullResult
from engine.integrations.prefill_review import (
    ImageReview,
    PrefillReviewer,
    ReviewPolicy,
    choose_audit,
    prefill_precision,
)
from model.iou import mask_iou
from storage.records import MaskRecord, make_mask_id
from storage.rle import decode_rles, encode_masks
from stages.semi.plan import (STAGE, Prefill, Pages)


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
