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

import time

from engine.integrations import labelling, runtime
from engine.integrations.config import EngineConfig
from engine.integrations.labelstudio import LabelStudio
from engine.integrations.ml_backend import precompute_embeddings
from engine.integrations.stage_kit import first_not_done
from storage.coco import GTObject
from storage.rle import decode_rles

# The steps' names, re-exported: callers (tests, the round loop) import them from stages.semi
from stages.semi.plan import (AUDIT_FILE, PLAN_FILE, STAGE, Pages, Prefill, _atomic_write_json,  # noqa: F401
                              compare_triage, make_plan, paginate, plan_prefills, rank_confident, round_dir,
                              saved_or_new_plan)
from stages.semi.pull import (Lineage, RoundTally, SemiSummary, _best_iou, audit_accepted,  # noqa: F401
                              completed_records, completed_summary, final_record, lineage_of, publish_pages,
                              records_from_pulls, review_pages, true_precision, write_final)


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
    """One semi-automatic round (steps: module doc). image_ids None: the first `images_per_round` images no manual
    or semi round has done. reviewer: who does step 3 (default: simulated annotators when `simulate`, else people
    in Label Studio, polled every poll_s)."""
    t0, s = time.monotonic(), cfg.stages.semi
    reviewer = reviewer or (SimulatedReview(runtime.ground_truth(cfg)) if simulate else PeopleReview(poll_s))
    store, quarantine, source = runtime.mask_store(cfg), runtime.quarantine(cfg), runtime.image_source(cfg)
    image_ids = image_ids if image_ids is not None else first_not_done(store, source, ("manual", STAGE),
                                                                       s.images_per_round)
    version = (segmenter := runtime.segmenter(cfg, checkpoint)).model_version
    # 1. Plan (once per round: a rerun reuses the saved plan); images the verifier judged complete skip people
    plan = saved_or_new_plan(cfg, round, segmenter, store, source, image_ids, quarantine, reviewer.truth)
    completed = [i for i, im in plan["images"].items() if im.get("complete")]
    pages = Pages.from_plan(plan, [i for i in plan["images"] if i not in completed])
    # 2-4. Publish, review, pull (every image complete: nothing for people, no Label Studio)
    pulls, ls_url, problems = publish_review_pull(cfg, round, checkpoint, segmenter, source, quarantine, plan,
                                                  pages, reviewer) if pages.prefills else ({}, None, 0)
    tally = RoundTally(images=len(pages.images))
    records, accepted, reviewed = pulled_records(pulls, pages, plan, completed, round, version, tally)
    done_by_verifier = completed_records(plan, completed, round, version)

    # 5. Audit (people's accepted prefills, and apart from them the complete images' masks); 6. Write
    done_tally = audit_round(cfg, round, records, accepted, done_by_verifier, len(completed), pages, reviewed,
                             reviewer.truth, tally)
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


def pulled_records(pulls: dict, pages: Pages, plan: dict, completed: list[str], round: int, version: str,
                   tally: RoundTally) -> tuple[list, list, set]:
    """Step 4's records with their lineage, counted into `tally`: (records, indexes of accepted prefills, the
    images someone reviewed)."""
    records, accepted = records_from_pulls(pulls, pages, round, version, tally)
    reviewed = {r.image_id for r in records} | {a.image_id for p in pulls.values() for a in p.annotations}
    tally.prefills = sum(len(pages.prefills[i]) for i in reviewed if i in pages.prefills)
    tally.dropped_by_cap = sum(im["dropped_by_cap"] for i, im in plan["images"].items() if i not in completed)
    tally.final_masks = len(records)
    return records, accepted, reviewed


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
        labelling.prefetch_embeddings(backend, images)
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
