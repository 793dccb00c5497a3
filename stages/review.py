"""The review queue: masks the engine doubts go back to people, and their decisions go into the lineage.

`run_review_stage` after a round (the round loop runs it after each semi round with `stages.review.enabled`):
  1. Plan (`doubted`): the round's masks that the engine does not trust on its own — masks their annotator
     ticked "unsure", accepted prefills picked
     for the audit that nobody has checked yet (people rounds: no truth to check them against), accepted
     prefills that failed their audit, and accepted prefills whose predicted IoU is under
     `stages.review.max_predicted_iou` — at most `stages.review.max_masks`, least trusted first.
  2. Publish: one Label Studio project "review r<round> …"; each image with doubted masks is a task, its doubted
     masks prefilled (orange), each region keyed by its mask id.
  3. Review or wait: simulated reviewers (engine/integrations/prefill_review.py: keep, fix or delete against the
     truth) or people.
  4. Pull: a region that kept its mask id and its mask was **accepted**; one that kept the id but changed was
     **fixed** (the new mask replaces the old, with the IoU between them); a mask whose region was deleted was
     **rejected**.
  5. Write: each decided mask is upserted (latest wins; the old version stays in its `history`): accepted and
     fixed masks are verified, rejected ones are not (training and the next calibration read verified masks
     only); `source.review` records the decision, the reviewer, the IoU and the round.
  6. Summarise.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from engine.integrations import labelling, runtime
from engine.integrations import agreement
from engine.integrations.annotator import SimulatedAnnotator
from engine.integrations.config import EngineConfig
from engine.integrations.labelling import at_full_size
from engine.integrations.labelstudio import LabelStudio, PrefillMask
from engine.integrations.prefill_review import ImageReview, PrefillReviewer, ReviewPolicy
from model.iou import mask_iou
from storage.records import MaskRecord
from storage.rle import decode_rles, encode_masks, rle_area, rle_bbox

STAGE = "review"


@dataclass
class ReviewSummary:
    """What one review did. queued: masks sent to people (why: reasons -> count); accepted / fixed / rejected:
    their decisions; undecided: queued masks of tasks nobody submitted (kept as they were)."""

    round: int
    queued: int = 0
    images: int = 0
    reasons: dict = field(default_factory=dict)
    accepted: int = 0
    fixed: int = 0
    rejected: int = 0
    undecided: int = 0
    ls_project_id: int | None = None
    ls_url: str = ""
    wall_s: float = 0.0
    stage: str = STAGE

    def to_dict(self) -> dict:
        return asdict(self)


def doubt(rec: MaskRecord, max_predicted_iou: float) -> str | None:
    """Why the engine does not trust `rec` on its own (None: it does). A mask its annotator marked "unsure" is
    doubted; otherwise only masks a person accepted from the model without drawing them are: drawn, fixed and
    already reviewed masks are a person's word."""
    source = rec.source if isinstance(rec.source, dict) else {}
    if "review" in source:
        return None
    if source.get("unsure"):  # the annotator said so (a per-region "unsure" tick), whoever drew the mask
        return "annotator unsure"
    if source.get("verifier_triage") == "review":  # the automatic stage's verifier was unsure of it
        return "verifier unsure"
    if rec.origin not in ("prefill_accepted", "verifier_accepted"):  # (the latter: nobody saw it)
        return None
    audit = source.get("audit") or {}
    if audit.get("pending"):
        return "audit pending"
    if audit.get("passed") is False:
        return "audit failed"
    if rec.predicted_iou is not None and rec.predicted_iou < max_predicted_iou:
        return "low predicted IoU"
    return None


def doubted(store, round: int, max_predicted_iou: float, max_masks: int,
            low_agreement: set[str] = frozenset()) -> list[tuple[MaskRecord, str]]:
    """(record, reason) of the round's doubted masks, least trusted first (masks of annotators whose agreement
    with others is below the set minimum, then failed audits, pending audits, then by predicted IoU), at most
    `max_masks`."""
    order = {"annotator below agreement": 0, "annotator unsure": 1, "audit failed": 2, "audit pending": 3,
             "verifier unsure": 4, "low predicted IoU": 5}

    def why(r: MaskRecord) -> str | None:
        reason = doubt(r, max_predicted_iou)
        reviewed = isinstance(r.source, dict) and "review" in r.source
        if r.annotator in low_agreement and r.verified and not reviewed:
            return "annotator below agreement"
        return reason

    found = [(r, reason) for r in store.iter_records(round=round) if (reason := why(r)) is not None]
    found.sort(key=lambda x: (order[x[1]], x[0].predicted_iou if x[0].predicted_iou is not None else 0.0,
                              x[0].image_id, x[0].mask_id))
    return found[:max_masks]


def decided(rec: MaskRecord, kept: np.ndarray | None, reviewer: str, round: int) -> tuple[MaskRecord, str, float]:
    """The record after review: kept (the region's mask at the file's size, or None when it was deleted)."""
    before = decode_rles([rec.rle])[0]
    if kept is None:
        decision, iou, new = "rejected", 0.0, replace(rec, verified=False)
    else:
        iou = float(mask_iou(kept, before))
        if np.array_equal(kept, before):
            decision, new = "accepted", replace(rec, verified=True)
        else:
            rle = encode_masks(kept[None])[0]
            decision = "fixed"
            new = replace(rec, rle=rle, area=int(rle_area([rle])[0]), bbox=rle_bbox([rle])[0].tolist(), verified=True)
    source = dict(rec.source) if isinstance(rec.source, dict) else {}
    source["review"] = {"decision": decision, "reviewer": reviewer, "iou": round_(iou), "round": int(round)}
    return replace(new, source=source), decision, iou


class PeopleReviewQueue:
    """People review the doubted masks in Label Studio: the stage waits until every task has an annotation."""

    simulated = False

    def __init__(self, poll_s: float = 30.0):
        self.poll_s = poll_s

    def review(self, ls: LabelStudio, cfg: EngineConfig, project_id: int, tasks: dict, images: list, masks: dict,
               backend_id: int | None, server) -> None:
        labelling.wait_for_people(ls, {project_id: len(tasks)}, self.poll_s,
                                  f"Label Studio project {project_id} at {ls.url}/projects/{project_id}: "
                                  f"{sum(len(m) for m in masks.values())} doubted masks to review (Ctrl-C to pull "
                                  "now)", labelling.login_line(cfg, server))


class SimulatedReviewQueue:
    """A simulated reviewer (engine/integrations/prefill_review.py) accepts, fixes or deletes each doubted mask
    through the real Label Studio API, knowing the truth."""

    simulated = True

    def __init__(self, truth: dict):
        self.truth = truth

    def review(self, ls: LabelStudio, cfg: EngineConfig, project_id: int, tasks: dict, images: list, masks: dict,
               backend_id: int | None, server) -> None:
        s = cfg.simulate
        reviewer = PrefillReviewer(SimulatedAnnotator(ls, backend_id, name="sim-reviewer-1",
                                                      settings=runtime.annotator_settings(cfg)),
                                   ReviewPolicy(s.review_accept_iou, s.review_edit_iou, s.cover_iou),
                                   s.seconds_per_review)
        done = ls.annotated_task_ids(project_id)
        for im in images:
            if tasks[im.image_id] not in done:
                reviewer.review_task(tasks[im.image_id], im, list(masks[im.image_id].items()),
                                     self.truth.get(im.image_id, []), ImageReview(), add_missing=False)


def run_review_stage(cfg: EngineConfig, round: int, checkpoint: str | None, simulate: bool = True,
                     poll_s: float = 30.0, reviewer: "PeopleReviewQueue | SimulatedReviewQueue | None" = None
                     ) -> ReviewSummary:
    """Send the round's doubted masks to people and record their decisions (steps: module doc). reviewer: who
    does step 3 (default: a simulated reviewer with `images.ground_truth` when `simulate`, else people)."""
    t0 = time.monotonic()
    r = cfg.stages.review
    store, quarantine, source = runtime.mask_store(cfg), runtime.quarantine(cfg), runtime.image_source(cfg)
    summary = ReviewSummary(round=round)

    # 1. Plan
    queue = doubted(store, round, r.max_predicted_iou, r.max_masks, agreement.below(cfg.workdir, r.min_agreement))
    by_image: dict[str, list[MaskRecord]] = {}
    for rec, why in queue:
        summary.reasons[why] = summary.reasons.get(why, 0) + 1
        by_image.setdefault(rec.image_id, []).append(rec)
    if queue:
        reviewer = reviewer or (SimulatedReviewQueue(runtime.ground_truth(cfg)) if simulate
                                else PeopleReviewQueue(poll_s))
        # 2-4. Publish, review or wait, pull: the latest annotation of each task decides its masks
        out = publish_review_pull(cfg, round, checkpoint, source, quarantine, by_image, reviewer, summary)
        summary.queued, summary.undecided = len(queue), len(queue) - len(out)

        # 5. Write (each mask keeps its stage and round: upserts go per (stage, round))
        for (stage, rnd), group in _groups(out).items():
            store.upsert(group, stage=stage, round=rnd, model_version=group[0].model_version)

    # 6. Summarise
    summary.wall_s = round_(time.monotonic() - t0, 1)
    return summary


def publish_review_pull(cfg: EngineConfig, round: int, checkpoint: str | None, source, quarantine,
                        by_image: dict[str, list[MaskRecord]], reviewer, summary: ReviewSummary) -> list[MaskRecord]:
    """Steps 2-4: the doubted masks as prefills of one task per image, the ML backend served while `reviewer`
    works, then the pull; returns the decided records (counting each decision in `summary`)."""
    segmenter = runtime.segmenter(cfg, checkpoint)
    ls, server = labelling.connect(cfg)
    images, _, full_sizes = labelling.task_images(cfg, source, sorted(by_image), quarantine, STAGE)
    frames = {im.image_id: (im.height, im.width) for im in images}
    masks = {i: {rec.mask_id: at_full_size(decode_rles([rec.rle])[0], frames[i]) for rec in by_image[i]}
             for i in frames}
    prefills = {i: [PrefillMask(mask=m, score=None, region_id=mid) for mid, m in masks[i].items()] for i in frames}
    project_id, tasks = labelling.publish(ls, cfg, labelling.project_title(cfg, STAGE, round),
                                          f"review of round {round}: masks the engine doubts", images, prefills,
                                          model_version=segmenter.model_version)
    summary.ls_project_id, summary.ls_url, summary.images = project_id, ls.url, len(tasks)
    with labelling.start_ml_backend(cfg, segmenter, source, ls.url, people=not reviewer.simulated,
                                    checkpoint=checkpoint) as backend:
        reviewer.review(ls, cfg, project_id, tasks, images, masks, labelling.connect_backend(ls, project_id, backend),
                        server)
    pull = ls.pull(project_id)
    for thing, reason in pull.problems:
        quarantine.add(f"labelstudio project {project_id} {thing}", reason, STAGE)
    latest = {}
    for ann in pull.annotations:
        if ann.task_id not in latest or (ann.updated_at or "") >= (latest[ann.task_id].updated_at or ""):
            latest[ann.task_id] = ann
    out: list[MaskRecord] = []
    for ann in latest.values():
        regions = {reg.region_id: reg for reg in ann.regions}
        for rec in by_image.get(ann.image_id, []):
            reg = regions.get(rec.mask_id)
            kept = None if reg is None else at_full_size(reg.mask, full_sizes[ann.image_id])
            new, decision, _ = decided(rec, kept, ann.annotator, round)
            setattr(summary, decision, getattr(summary, decision) + 1)
            out.append(new)
    return out


def _groups(records: list[MaskRecord]) -> dict[tuple[str, int], list[MaskRecord]]:
    groups: dict[tuple[str, int], list[MaskRecord]] = {}
    for rec in records:
        groups.setdefault((rec.stage, rec.round), []).append(rec)
    return groups


def round_(v: float, digits: int = 4) -> float:
    return round(float(v), digits)
