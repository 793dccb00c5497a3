"""The fully automatic stage: every image -> grid-prompted masks -> Parquet shards, on a Ray actor pool.

Steps: plan (model, filters — calibrated on history when `stages.auto.calibrate` — and the images not yet
done) -> generate and write (`map_with_actor_pool`, one model per actor, `generate_with_fallback`; each actor
writes its batch's masks as one staged shard of its own, `MaskStore.write_part`, and hands back only that
shard's descriptor and a line per image) -> commit (the driver adopts the parts into one manifest commit every
`images_per_commit` images) -> summarise. No mask passes through the driver (`driver_bytes` counts what does).
The committed image index says which images are done for this model version, so a rerun (after a crash, or a
SIGKILL) does only the rest, and an image is never written twice: its masks (its part) and its "done" row land
in the same commit, and a part whose images are done already (a task Ray delivered twice) is not adopted.
Bad images and images the model fails on even at a smaller scale go to the quarantine.
With `stages.auto.verifier` (a mask verifier, model/verifier.py) every survivor gets its score in the lineage;
below `verifier_drop` it is dropped, below `verifier_keep` it is kept and marked for the review queue
(`source.verifier_triage = "review"`: stages/review.py sends it to people).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.integrations import runtime
from engine.integrations.config import EngineConfig
from engine.integrations.runtime import ModelSpec, Resources
from engine.integrations.stage_kit import (OK, PoolPlan, images_to_do, outcome_of, part_row, round_, run_on_pool,
                                           steady_rates)
from model.amg import device_points_per_batch, generate_with_fallback, to_records
from model.amg_params import AmgParams
from model.calibration import CalibrationSettings, calibrate, generator_params
from model.evaluate import match_rates
from model.verifier import MaskVerifier, mask_features, uncovered_objectness
from storage.images import BadImage
from storage.rle import decode_rles

log = logging.getLogger("sa_engine.auto")
LIKELY_INCOMPLETE = 0.2  # share of the survivors' area the verifier left uncovered that flags an image
STAGE = "auto"


@dataclass
class AutoSummary:
    """What one automatic-stage run did. images: done in this run; already_done: skipped (done before for
    this model version); set_aside: skipped because the quarantine holds them (permanent, or transient
    past `images.transient_retries`: `sa-engine quarantine release` lets them through); retried: transient
    quarantine entries tried again in this run; quarantined: set aside in this run; thresholds: the filter thresholds used and where they came from;
    seconds: from asking the pool for results to the last commit; first_result_s: pool start-up plus one
    image; steady_images_per_s / steady_masks_per_s: the rates after each actor's first result (0.0 when
    there are too few results to tell); actor_s_per_image / actor_cpu_s_per_image: wall and CPU time inside
    the actors per image (equal when each actor had a core to itself); truth: where `images.ground_truth` is
    set, recall and precision of this model's masks at mask IoU 0.5 and 0.75 on the stage's images that have
    ground truth (a stage that writes 1.6 masks where 9 exist shows it)."""

    round: int
    images: int = 0
    masks: int = 0
    masks_per_image: float = 0.0
    images_per_s: float = 0.0
    quarantined: int = 0
    already_done: int = 0
    set_aside: int = 0
    retried: int = 0
    model_version: str = ""
    commits: int = 0
    seconds: float = 0.0
    first_result_s: float = 0.0
    steady_images_per_s: float = 0.0
    steady_masks_per_s: float = 0.0
    actor_s_per_image: float = 0.0
    actor_cpu_s_per_image: float = 0.0
    thresholds: dict = field(default_factory=dict)
    parts: int = 0  # shard files the actors wrote and the driver committed
    verifier_version: str | None = None  # stages.auto.verifier's, when set
    verifier_dropped: int = 0  # masks the verifier dropped (score < verifier_drop)
    verifier_review: int = 0  # masks kept and marked for review (verifier_drop <= score < verifier_keep)
    likely_incomplete: list = field(default_factory=list)  # with a verifier: images where it dropped a fifth or more
    # of the survivors' area (model/verifier.py uncovered_objectness): people should look there
    driver_bytes: int = 0  # what the actors handed the driver (part descriptors + a line per image)
    driver_bytes_per_mask: float = 0.0
    truth: dict | None = None  # against images.ground_truth, when set: model/evaluate.py match_rates + images
    stage: str = STAGE

    def to_dict(self) -> dict:
        return asdict(self)


class AutoMaskActor:
    """One pool member: builds the model and opens the store once, then turns image ids into a staged shard.

    batch: {"image_id": (B,) str}. The batch's files are decoded in threads while the model works, and the
    whole images are embedded in one encoder call; the batch's masks go to the store as one part
    (`MaskStore.write_part`). Returns one row: {"part": the part's ShardInfo as JSON ("" when the batch made no
    mask), "images": JSON list, per image, of {"image_id", "status" ("ok" | "bad" | "failed"), "reason", "kind"
    (the quarantine class of a bad or failed image), "masks", "scale", "seconds", "cpu_seconds" (this
    process's CPU time on the image)}}.
    """

    def __init__(self, plan: "AutoPlan", params: AmgParams, index_key: str):
        torch.set_num_threads(plan.pool.threads)
        self.segmenter = plan.model.build()
        # On a GPU, decoder batches as large as its memory allows
        self.params = replace(params, points_per_batch=device_points_per_batch(self.segmenter, params.points_per_batch))
        self.source = plan.resources.image_source()
        self.store = plan.resources.mask_store()
        self.verifier, self.keep, self.drop = plan.verifier, plan.verifier_keep, plan.verifier_drop
        self.round, self.index_key = plan.round, index_key
        self.loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="image-decode")

    def _load(self, image_id: str):
        try:
            return self.source.load(self.source.ref(image_id))
        except BadImage as e:
            return e

    def _embed(self, images: list) -> list:
        """The whole images' embeddings in one encoder call (None each when that call fails: the generator
        then embeds each image itself, at a smaller scale if it must)."""
        try:
            return self.segmenter.embed([im.pixels for im in images], batch_size=max(1, len(images)))
        except (RuntimeError, MemoryError):
            return [None] * len(images)

    def _triage(self, pixels: np.ndarray, records: list) -> tuple[list, int, int, float | None]:
        """The verifier's keep / review / drop (module doc): (kept records, dropped, marked for review, the share of
        the survivors' area no kept mask covers — None without a verifier)."""
        if self.verifier is None or not records:
            return records, 0, 0, None
        feats = mask_features(pixels, [r.rle for r in records], [r.predicted_iou for r in records],
                              [r.stability_score for r in records])
        kept, review = [], 0
        for rec, score in zip(records, self.verifier.score(feats)):
            if score < self.drop:
                continue
            rec.verifier_version, rec.verifier_score = self.verifier.version, float(score)
            if score < self.keep:
                rec.source = {**(rec.source or {}), "verifier_triage": "review"}
                review += 1
            kept.append(rec)
        survivors = [r.rle for r in records]
        uncovered = uncovered_objectness(survivors, [1.0] * len(survivors),
                                         np.array([any(r is k for k in kept) for r in records]), min_objectness=0.0)
        return kept, len(records) - len(kept), review, uncovered

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        start, cpu_start = time.perf_counter(), time.process_time()
        loaded = list(self.loader.map(self._load, ids))
        good = [im for im in loaded if not isinstance(im, BadImage)]
        embeddings = dict(zip((im.image_id for im in good), self._embed(good)))
        shared, cpu_shared = time.perf_counter() - start, time.process_time() - cpu_start
        lines, records_all = [], []
        for image_id, image in zip(ids, loaded):
            start, cpu_start = time.perf_counter(), time.process_time()
            status, reason, kind, records, scale, dropped, review, uncovered = OK, "", "", [], 1.0, 0, 0, None
            try:
                if isinstance(image, BadImage):
                    raise image
                masks, scale = generate_with_fallback(self.segmenter, image.pixels, self.params,
                                                      embedding=embeddings.get(image.image_id),
                                                      output_size=image.original_size)
                records = to_records(masks, image_id, self.round, self.segmenter.model_version)
                records, dropped, review, uncovered = self._triage(image.pixels, records)
            except (BadImage, RuntimeError, MemoryError, ValueError) as e:  # the model failed even at a smaller scale
                status, reason, kind = outcome_of(e)
            if status != OK:  # an image set aside leaves no mask in the part (it is not marked done)
                records, dropped, review, uncovered = [], 0, 0, None
            records_all += records
            # the batch's shared work (decoding files, the encoder call) is shared evenly
            lines.append({"image_id": image_id, "status": status, "reason": reason, "kind": kind,
                          "masks": len(records), "scale": scale, "dropped": dropped, "review": review,
                          "uncovered": uncovered,
                          "seconds": round(time.perf_counter() - start + shared / len(ids), 4),
                          "cpu_seconds": round(time.process_time() - cpu_start + cpu_shared / len(ids), 4)})
        return part_row(self.store, records_all, STAGE, self.round, self.index_key, lines)


@dataclass(frozen=True)
class AutoPlan:
    """Everything an automatic-stage run does, read from the config once (`plan_auto_stage`); nothing below it
    sees the config. calibration: with `stages.auto.calibrate`, the loose generator history is re-run with and
    the precision aimed for (else None: the config's thresholds in `params`)."""

    round: int
    resources: Resources
    model: ModelSpec
    params: AmgParams
    pool: PoolPlan
    image_ids: list[str] | None = None
    calibration: tuple[AmgParams, CalibrationSettings] | None = None
    verifier: MaskVerifier | None = None
    verifier_keep: float = 0.5
    verifier_drop: float = 0.1


def plan_auto_stage(cfg: EngineConfig, round: int, checkpoint: str | None,
                    image_ids: list[str] | None = None) -> AutoPlan:
    """The config, read once. The pool's index key (the model version) is filled in when the model is built."""
    a = cfg.stages.auto
    return AutoPlan(
        round=round, resources=runtime.resources(cfg), model=runtime.model_spec(cfg, checkpoint),
        params=runtime.amg_params(a),
        pool=runtime.pool_plan(cfg, STAGE, round, "", a.num_actors, a.images_per_commit, a.images_per_batch),
        image_ids=image_ids,
        calibration=(runtime.calibration_params(cfg), runtime.calibration_settings(cfg, "auto")) if a.calibrate
        else None,
        verifier=MaskVerifier.load(cfg.path(a.verifier)) if a.verifier else None,
        verifier_keep=a.verifier_keep, verifier_drop=a.verifier_drop)


def filter_params(plan: AutoPlan, segmenter, store, source, quarantine) -> tuple[AmgParams, dict]:
    """The generator's parameters and the thresholds used. With a calibration plan, the thresholds are
    chosen from the verified masks of earlier rounds as the semi-automatic stage chooses its prefill
    thresholds (model/calibration.py: the loosest pair whose precision lower bound reaches
    `stages.auto.target_precision`, on the `calibration` section's history): a young model's IoU head is far from
    SAM's calibration, so SAM's fixed 0.88 / 0.95 would keep nothing or keep noise. Else the config's thresholds."""
    if plan.calibration is None:
        return plan.params, {"pred_iou_thresh": plan.params.pred_iou_thresh,
                             "stability_score_thresh": plan.params.stability_score_thresh, "source": "config"}
    loose, settings = plan.calibration
    thresholds = calibrate(segmenter, store, source, plan.round, loose, settings,
                           on_problem=lambda thing, reason: quarantine.add(thing, reason, STAGE))
    return generator_params(plan.params, thresholds), thresholds.to_dict()


def run_auto_stage(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str] | None = None,
                   show_progress: bool = True) -> AutoSummary:
    """Generate masks for every image not yet done for this model version; resumable, idempotent.

    image_ids: restrict to these (default: every image of the source)."""
    return run_auto_plan(plan_auto_stage(cfg, round, checkpoint, image_ids), show_progress)


def run_auto_plan(plan: AutoPlan, show_progress: bool = True) -> AutoSummary:
    """Plan -> generate on the actor pool -> commit (stage_kit.run_on_pool) -> summarise."""
    res = plan.resources
    store, quarantine, source = res.mask_store(), res.quarantine(), res.image_source()
    # The model once here, for its version and calibration (actors build their own); the filters; the images
    driver_model = plan.model.build(on_device="cpu")
    version = driver_model.model_version
    pool = replace(plan.pool, index_key=version)
    params, thresholds = filter_params(plan, driver_model, store, source, quarantine)
    images = images_to_do(store, quarantine, source, STAGE, version, plan.image_ids)
    summary = AutoSummary(round=plan.round, already_done=images.already_done, set_aside=images.set_aside,
                          retried=len(images.retrying), model_version=version, thresholds=thresholds,
                          verifier_version=plan.verifier.version if plan.verifier else None)
    if not images.todo:
        return summary
    # Generate and commit: a part (its masks) and its images' "done" rows in one commit every
    # `images_per_commit` images; the masks themselves never come to the driver
    done = run_on_pool(pool, images, [{"image_id": i} for i in images.todo], AutoMaskActor,
                       (plan, params, version), store, quarantine, source, show_progress)
    summarise(summary, done, pool)
    summary.truth = against_truth(res, store, version, images.wanted)
    return summary


def summarise(summary: AutoSummary, done, pool: PoolPlan) -> None:
    """The pool's figures into the summary, per image and per second."""
    for line in done.ok_lines:
        summary.verifier_dropped += int(line.get("dropped", 0))
        summary.verifier_review += int(line.get("review", 0))
        if (line.get("uncovered") or 0.0) >= LIKELY_INCOMPLETE:
            summary.likely_incomplete.append(line["image_id"])
        if float(line["scale"]) != 1.0:
            log.warning("%s: model failed at full scale; masks made at scale %.2f", line["image_id"], line["scale"])
    summary.images, summary.masks, summary.parts = done.images, done.masks, done.parts
    summary.commits, summary.quarantined, summary.driver_bytes = done.commits, done.quarantined, done.driver_bytes
    summary.seconds = round_(done.seconds)
    summary.images_per_s = round_(done.images / max(done.seconds, 1e-9))
    summary.masks_per_image = round_(done.masks / max(done.images, 1))
    summary.driver_bytes_per_mask = round_(done.driver_bytes / max(done.masks, 1))
    summary.actor_s_per_image = round_(done.actor_s / max(len(done.arrivals), 1))
    summary.actor_cpu_s_per_image = round_(done.actor_cpu_s / max(len(done.arrivals), 1))
    num_actors = max(1, min(pool.num_actors, len(done.arrivals) or 1))
    for key, value in steady_rates(done.arrivals, num_actors).items():
        setattr(summary, key, value)


def against_truth(res: Resources, store, model_version: str, image_ids: list[str]) -> dict | None:
    """Recall and precision (IoU 0.5 / 0.75) of the stage's masks for `model_version` on the images of
    `image_ids` that are done and have ground truth; None without a readable `images.ground_truth`."""
    path = res.ground_truth_file
    if path is None or ("://" not in path and not Path(path).is_file()):
        return None  # no ground truth here (the key's default names the demo's file)
    try:
        truth = res.ground_truth("recall against ground truth")
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # scoring must not undo a stage that has written its masks
        log.warning("automatic stage not scored against %s: %s", path, str(e).splitlines()[0][:200])
        return None
    ids = sorted(set(image_ids) & store.images_done(STAGE, model_version) & set(truth))
    pred: dict[str, list] = {i: [] for i in ids}
    for rec in store.iter_records(stage=STAGE, model_version=model_version, image_ids=ids):
        pred[rec.image_id].append(rec.rle)
    sized = {i: (truth[i][0].mask.shape if truth[i] else None) for i in ids}
    pred_masks = {i: decode_rles(r) if r else np.zeros((0, *(sized[i] or (1, 1))), bool) for i, r in pred.items()}
    truth_masks = {i: np.stack([o.mask for o in truth[i]]) for i in ids if truth[i]}
    return {"images": len(ids), **match_rates(pred_masks, truth_masks)}
