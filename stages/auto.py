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

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.integrations import runtime
from engine.integrations.cluster import init_ray, map_with_actor_pool
from engine.integrations.config import EngineConfig
from model.amg import device_points_per_batch, generate_with_fallback, to_records
from model.amg_params import AmgParams
from model.segmenter import failure_kind
from model.calibration import calibrate, generator_params
from model.evaluate import match_rates
from model.verifier import MaskVerifier, mask_features, uncovered_objectness
from storage.images import BadImage
from storage.rle import decode_rles
from storage.shards import ShardInfo

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

    def __init__(self, cfg: EngineConfig, checkpoint: str | None, params: AmgParams, round: int, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.segmenter = runtime.segmenter(cfg, checkpoint)
        # On a GPU, decoder batches as large as its memory allows
        self.params = replace(params, points_per_batch=device_points_per_batch(self.segmenter, params.points_per_batch))
        self.source = runtime.image_source(cfg)
        self.store = runtime.mask_store(cfg)
        a = cfg.stages.auto
        self.verifier = MaskVerifier.load(cfg.path(a.verifier)) if a.verifier else None
        self.keep, self.drop = a.verifier_keep, a.verifier_drop
        self.round = round
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
            status, reason, kind, records, scale, dropped, review, uncovered = "ok", "", "", [], 1.0, 0, 0, None
            try:
                if isinstance(image, BadImage):
                    raise image
                masks, scale = generate_with_fallback(self.segmenter, image.pixels, self.params,
                                                      embedding=embeddings.get(image.image_id),
                                                      output_size=image.original_size)
                records = to_records(masks, image_id, self.round, self.segmenter.model_version)
                records, dropped, review, uncovered = self._triage(image.pixels, records)
            except BadImage as e:
                status, reason, kind = "bad", str(e), e.kind
            except (RuntimeError, MemoryError, ValueError) as e:  # the model failed even at a smaller scale
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                status, reason, kind = ("failed", f"model failed at every scale: {type(e).__name__}: {first}",
                                        failure_kind(e))
            if status != "ok":  # an image set aside leaves no mask in the part (it is not marked done)
                records, dropped, review, uncovered = [], 0, 0, None
            records_all += records
            # the batch's shared work (decoding files, the encoder call) is shared evenly
            lines.append({"image_id": image_id, "status": status, "reason": reason, "kind": kind,
                          "masks": len(records), "scale": scale, "dropped": dropped, "review": review,
                          "uncovered": uncovered,
                          "seconds": round(time.perf_counter() - start + shared / len(ids), 4),
                          "cpu_seconds": round(time.process_time() - cpu_start + cpu_shared / len(ids), 4)})
        part = ""
        if records_all:  # written here, by this worker; the driver commits it (or gc removes it)
            info = self.store.write_part(records_all, STAGE, self.round, self.segmenter.model_version)
            part = json.dumps(asdict(info), separators=(",", ":"))
        return {"part": np.array([part], dtype=object),
                "images": np.array([json.dumps(lines, separators=(",", ":"))], dtype=object)}


def filter_params(cfg: EngineConfig, segmenter, store, source, quarantine, round: int) -> tuple[AmgParams, dict]:
    """The generator's parameters and the thresholds used. With `stages.auto.calibrate`, the thresholds are
    chosen from the verified masks of earlier rounds as the semi-automatic stage chooses its prefill
    thresholds (model/calibration.py: the loosest pair whose precision lower bound reaches
    `stages.auto.target_precision`, default `stages.semi.target_precision`): a young model's IoU head is far from SAM's calibration, so SAM's fixed
    0.88 / 0.95 would keep nothing or keep noise. Else the config's thresholds."""
    a = cfg.stages.auto
    params = runtime.amg_params(a)
    if not a.calibrate:
        return params, {"pred_iou_thresh": a.pred_iou_thresh, "stability_score_thresh": a.stability_score_thresh,
                        "source": "config"}
    thresholds = calibrate(segmenter, store, source, round, runtime.calibration_params(cfg),
                           runtime.calibration_settings(cfg, "auto"),
                           on_problem=lambda thing, reason: quarantine.add(thing, reason, STAGE))
    return generator_params(params, thresholds), thresholds.to_dict()


def run_auto_stage(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str] | None = None,
                   show_progress: bool = True) -> AutoSummary:
    """Generate masks for every image not yet done for this model version; resumable, idempotent.

    image_ids: restrict to these (default: every image of the source)."""
    a = cfg.stages.auto
    store, quarantine, source = runtime.mask_store(cfg), runtime.quarantine(cfg), runtime.image_source(cfg)

    # Plan: the model (loaded once here for its version and calibration; actors build their own), the
    # filters, and the images not yet done for this model version.
    driver_model = runtime.segmenter(cfg, checkpoint, on_device="cpu")
    params, thresholds = filter_params(cfg, driver_model, store, source, quarantine, round)
    wanted = [r.image_id for r in source.list()] if image_ids is None else list(dict.fromkeys(image_ids))
    done = store.images_done(STAGE, driver_model.model_version)
    held, retrying = quarantine.things(STAGE), quarantine.retrying(STAGE)
    todo = [i for i in wanted if i not in done and source.ref(i).uri not in held]
    summary = AutoSummary(round=round, already_done=sum(i in done for i in wanted),
                          set_aside=sum(i not in done and source.ref(i).uri in held for i in wanted),
                          retried=sum(source.ref(i).uri in retrying for i in todo),
                          model_version=driver_model.model_version, thresholds=thresholds,
                          verifier_version=MaskVerifier.load(cfg.path(a.verifier)).version if a.verifier else None)
    if summary.set_aside:
        log.warning("%d image(s) held in the quarantine are skipped (`sa-engine quarantine list`, then "
                    "`release` to try them again)", summary.set_aside)
    if not todo:
        return summary

    # Generate on the actor pool
    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    threads = max(1, int(cfg.ray.cpus_per_actor)) if cfg.ray.gpus_per_actor == 0 else 1
    num_actors = max(1, min(a.num_actors, len(todo)))
    rows = map_with_actor_pool(
        [{"image_id": i} for i in todo], AutoMaskActor,
        # paths resolved here, where the work dir is known: an actor may run elsewhere, in another folder
        actor_args=(cfg.model_copy(update={"workdir": str(Path(cfg.workdir).resolve())}),
                    runtime.checkpoint_path(cfg, checkpoint), params, round, threads),
        num_actors=num_actors, cpus_per_actor=cfg.ray.cpus_per_actor,
        gpus_per_actor=cfg.ray.gpus_per_actor, batch_size=a.images_per_batch)

    # Commit: a part (its masks) and its images' "done" rows land in the same commit, every `images_per_commit`
    # images; the masks themselves never come here
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []  # (seconds since start, masks) per result
    actor_s = actor_cpu_s = 0.0
    since_commit = 0
    taken: set[str] = set()  # images whose part this run adopted
    with _Progress(len(todo), show_progress) as progress, store.writer(STAGE, round, summary.model_version) as writer:
        for row in rows:
            summary.driver_bytes += len(row["part"]) + len(row["images"])
            lines = json.loads(row["images"])
            ok = [ln for ln in lines if ln["status"] == "ok"]
            if any(ln["image_id"] in taken for ln in ok):  # delivered twice: the first copy counts
                log.warning("a part for %d image(s) done already in this run was left out (gc removes it)", len(ok))
                continue
            if row["part"]:
                writer.adopt(ShardInfo.from_json(json.loads(row["part"])))
                summary.parts += 1
            for line in lines:
                image_id, n = line["image_id"], 0
                if line["status"] == "ok":
                    n = int(line["masks"])
                    writer.image_done(image_id, n)
                    summary.verifier_dropped += int(line.get("dropped", 0))
                    summary.verifier_review += int(line.get("review", 0))
                    if (line.get("uncovered") or 0.0) >= LIKELY_INCOMPLETE:
                        summary.likely_incomplete.append(image_id)
                    taken.add(image_id)
                    summary.images += 1
                    summary.masks += n
                    if float(line["scale"]) != 1.0:
                        log.warning("%s: model failed at full scale; masks made at scale %.2f", image_id, line["scale"])
                else:
                    quarantine.add(source.ref(image_id).uri, line["reason"], STAGE, line["kind"] or "permanent")
                    summary.quarantined += 1
                arrivals.append((time.perf_counter() - start, n))
                actor_s, actor_cpu_s = actor_s + float(line["seconds"]), actor_cpu_s + float(line["cpu_seconds"])
                since_commit += 1
                progress.advance(summary.images, summary.masks, time.perf_counter() - start)
            if since_commit >= a.images_per_commit:
                writer.commit()
                summary.commits += 1
                since_commit = 0
        if since_commit:
            writer.commit()
            summary.commits += 1
    # Images set aside as transient that are done now leave the quarantine
    if summary.retried:
        done_now = store.images_done(STAGE, summary.model_version)
        quarantine.release([source.ref(i).uri for i in todo if i in done_now and source.ref(i).uri in retrying],
                           stage=STAGE)

    # Summarise
    seconds = time.perf_counter() - start
    summary.seconds = round_(seconds)
    summary.images_per_s = round_(summary.images / max(seconds, 1e-9))
    summary.masks_per_image = round_(summary.masks / max(summary.images, 1))
    summary.driver_bytes_per_mask = round_(summary.driver_bytes / max(summary.masks, 1))
    summary.actor_s_per_image = round_(actor_s / max(len(arrivals), 1))
    summary.actor_cpu_s_per_image = round_(actor_cpu_s / max(len(arrivals), 1))
    for key, value in steady_rates(arrivals, num_actors).items():
        setattr(summary, key, value)
    summary.truth = against_truth(cfg, store, summary.model_version, wanted)
    return summary


def against_truth(cfg: EngineConfig, store, model_version: str, image_ids: list[str]) -> dict | None:
    """Recall and precision (IoU 0.5 / 0.75) of the stage's masks for `model_version` on the images of
    `image_ids` that are done and have ground truth; None without a readable `images.ground_truth`."""
    path = cfg.path(cfg.images.ground_truth) if cfg.images.ground_truth else None
    if path is None or ("://" not in path and not Path(path).is_file()):
        return None  # no ground truth here (the key's default names the demo's file)
    try:
        truth = runtime.ground_truth(cfg, "recall against ground truth")
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


def steady_rates(arrivals: list[tuple[float, int]], num_actors: int) -> dict:
    """Throughput with actor start-up left out.

    arrivals: (seconds since the pool was asked for results, masks) per result, in arrival order.
    Each actor's first result pays its start-up; after the `num_actors`-th result every actor is
    warm, so the rate is taken from there to the last result: (n - k) results in (t_n - t_k).
    """
    out = dict(first_result_s=round_(arrivals[0][0]) if arrivals else 0.0,
               steady_images_per_s=0.0, steady_masks_per_s=0.0)
    k = num_actors
    if len(arrivals) > k and arrivals[-1][0] > arrivals[k - 1][0]:
        window = arrivals[-1][0] - arrivals[k - 1][0]
        out["steady_images_per_s"] = round_((len(arrivals) - k) / window)
        out["steady_masks_per_s"] = round_(sum(m for _, m in arrivals[k:]) / window)
    return out


def round_(x: float) -> float:
    return float(f"{x:.4g}")


class _Progress:
    """A rich progress line: images done / total, images/s, masks/image (stderr; silent if disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and os.environ.get("SA_ENGINE_NO_PROGRESS") != "1"
        self.bar = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self.bar = Progress(TextColumn("auto"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[rate]}"), console=Console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task("auto", total=self.total, rate="")
        return self

    def advance(self, images: int, masks: int, seconds: float) -> None:
        if self.bar is not None:
            rate = f"{images / max(seconds, 1e-9):.2f} images/s, {masks / max(images, 1):.1f} masks/image"
            self.bar.update(self.task, advance=1, rate=rate)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
