"""The fully automatic stage: every image -> grid-prompted masks -> Parquet shards, on a Ray actor pool.

images (ImageSource) -> `map_with_actor_pool` (one model per actor) -> `generate_with_fallback` ->
MaskStore writer, committed every `images_per_commit` images. The committed image index says which
images are done for this model version, so a rerun (after a crash, or a SIGKILL) does only the rest,
and an image is never written twice: its masks and its "done" row land in the same commit.
Bad images and images the model fails on even at a smaller scale go to the quarantine.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import asdict

import numpy as np

from engine.config import EngineConfig

log = logging.getLogger("sa_engine.auto")
STAGE = "auto"


class AutoMaskActor:
    """One pool member: builds the model once, then turns image ids into pickled MaskRecords.

    batch: {"image_id": (B,) str}. Returns {"image_id", "status" ("ok" | "bad" | "failed"),
    "reason", "records" (pickled list[MaskRecord]), "scale", "seconds", "cpu_seconds" (this
    process's CPU time on the image)}, one row per image.
    """

    def __init__(self, model_path: str | None, preset: str, device: str, params: dict, images: dict,
                 round: int, threads: int = 1):
        import torch

        from model.amg import AmgParams
        from model.segmenter import Segmenter
        from storage.images import ImageSource

        torch.set_num_threads(max(1, threads))
        self.segmenter = Segmenter.load(model_path, device=device) if model_path else Segmenter.new(preset, device=device)
        self.params = AmgParams(**params)
        self.source = ImageSource(**images)
        self.round = round

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from model.amg import generate_with_fallback, to_records
        from storage.images import BadImage

        out: dict[str, list] = {k: [] for k in ("image_id", "status", "reason", "records", "scale", "seconds",
                                                "cpu_seconds")}
        for image_id in batch["image_id"]:
            image_id = str(image_id)
            start, cpu_start = time.perf_counter(), time.process_time()
            status, reason, records, scale = "ok", "", [], 1.0
            try:
                image = self.source.load(self.source.ref(image_id))
                masks, scale = generate_with_fallback(self.segmenter, image.pixels, self.params)
                records = to_records(masks, image_id, self.round, self.segmenter.model_version)
            except BadImage as e:
                status, reason = "bad", str(e)
            except (RuntimeError, MemoryError, ValueError) as e:  # the model failed even at a smaller scale
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                status, reason = "failed", f"model failed at every scale: {type(e).__name__}: {first}"
            out["image_id"].append(image_id)
            out["status"].append(status)
            out["reason"].append(reason)
            out["records"].append(pickle.dumps(records))
            out["scale"].append(scale)
            out["seconds"].append(time.perf_counter() - start)
            out["cpu_seconds"].append(time.process_time() - cpu_start)
        return {k: np.array(v, dtype=object) if k in ("records", "reason", "image_id", "status") else np.array(v)
                for k, v in out.items()}


def resolve_model(cfg: EngineConfig, checkpoint: str | None):
    """(checkpoint path or None for a fresh seeded preset model, the driver's Segmenter).

    The driver loads the model once (its version; calibration); actors build their own copy.
    """
    from model.segmenter import Segmenter

    path = checkpoint or cfg.model.checkpoint
    path = cfg.path(path) if path else None
    return path, Segmenter.load(path) if path else Segmenter.new(cfg.model.preset)


def calibrated_thresholds(cfg: EngineConfig, segmenter, store, source, quarantine, round: int) -> dict:
    """Filter thresholds chosen from the verified masks of earlier rounds, as the semi-automatic stage
    chooses its prefill thresholds (stages/semi.py, model/calibration.py: the loosest pair whose
    precision lower bound reaches `stages.semi.target_precision`). A young model's IoU head is far
    from SAM's calibration, so SAM's fixed 0.88 / 0.95 would keep nothing or keep noise."""
    from model.amg import AmgParams
    from stages.semi import build_history, calibrate

    s = cfg.stages.semi
    loose = AmgParams.from_config(cfg.stages.auto, pred_iou_thresh=s.calibration_pred_iou_floor,
                                  stability_score_thresh=s.calibration_stability_floor)
    samples = build_history(segmenter, store, source, round, loose, s.calibration_images,
                            on_problem=lambda thing, reason: quarantine.add(thing, reason, STAGE))
    return calibrate(cfg, samples).to_dict()


def _device(cfg: EngineConfig) -> str:
    if cfg.model.device != "auto":
        return cfg.model.device
    if cfg.ray.gpus_per_actor > 0:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def run_auto_stage(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str] | None = None,
                   show_progress: bool = True) -> dict:
    """Generate masks for every image not yet done for this model version; resumable, idempotent.

    image_ids: restrict to these (default: every image of the source). Returns a summary:
    images (done in this run), masks, masks_per_image, images_per_s, quarantined, already_done,
    model_version, commits, seconds, and the steady state: first_result_s (pool start-up plus one
    image), steady_images_per_s / steady_masks_per_s over the results after each actor's first one
    (0.0 when there are too few results to tell); actor_s_per_image / actor_cpu_s_per_image: wall
    and CPU time inside the actors per image (equal when each actor had a core to itself).
    """
    from engine.cluster import init_ray, map_with_actor_pool
    from model.amg import AmgParams
    from storage.images import ImageSource
    from storage.quarantine import Quarantine
    from storage.shards import MaskStore

    a = cfg.stages.auto
    params = asdict(AmgParams.from_config(a))
    images = dict(uri=cfg.path(cfg.images.source), max_side=cfg.images.max_side,
                  large_images=cfg.images.large_images, s3_endpoint_url=cfg.storage.s3_endpoint_url)
    source = ImageSource(**images)
    root = cfg.path(cfg.storage.root)
    store = MaskStore(root, s3_endpoint_url=cfg.storage.s3_endpoint_url, shard_target_mb=cfg.storage.shard_target_mb)
    quarantine = Quarantine(root, s3_endpoint_url=cfg.storage.s3_endpoint_url)
    model_path, driver_model = resolve_model(cfg, checkpoint)
    model_version = driver_model.model_version
    thresholds = None
    if a.calibrate:
        thresholds = calibrated_thresholds(cfg, driver_model, store, source, quarantine, round)
        params["pred_iou_thresh"] = max(0.0, thresholds["pred_iou_thresh"] - 1e-6)  # generator keeps >, calibration >=
        params["stability_score_thresh"] = thresholds["stability_thresh"]

    wanted = [r.image_id for r in source.list()] if image_ids is None else list(dict.fromkeys(image_ids))
    done = store.images_done(STAGE, model_version)
    set_aside = quarantine.things(STAGE)
    todo = [i for i in wanted if i not in done and source.ref(i).uri not in set_aside]
    summary = dict(images=0, masks=0, masks_per_image=0.0, images_per_s=0.0, quarantined=0,
                   already_done=len(wanted) - len(todo), model_version=model_version, commits=0, seconds=0.0,
                   first_result_s=0.0, steady_images_per_s=0.0, steady_masks_per_s=0.0,
                   actor_s_per_image=0.0, actor_cpu_s_per_image=0.0, thresholds=thresholds or {
                       "pred_iou_thresh": a.pred_iou_thresh, "stability_thresh": a.stability_score_thresh,
                       "source": "config"})
    if not todo:
        return summary

    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    threads = max(1, int(cfg.ray.cpus_per_actor)) if cfg.ray.gpus_per_actor == 0 else 1
    num_actors = max(1, min(a.num_actors, len(todo)))
    rows = map_with_actor_pool(
        [{"image_id": i} for i in todo], AutoMaskActor,
        actor_args=(model_path, cfg.model.preset, _device(cfg), params, images, round, threads),
        num_actors=num_actors, cpus_per_actor=cfg.ray.cpus_per_actor,
        gpus_per_actor=cfg.ray.gpus_per_actor, batch_size=1)

    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []  # (seconds since start, masks) per result
    actor_s = actor_cpu_s = 0.0
    since_commit = 0
    with _Progress(len(todo), show_progress) as progress, store.writer(STAGE, round, model_version) as writer:
        for row in rows:
            image_id, status = str(row["image_id"]), str(row["status"])
            if status == "ok":
                records = pickle.loads(row["records"])
                writer.add(records)
                writer.image_done(image_id, len(records))
                summary["images"] += 1
                summary["masks"] += len(records)
                if float(row["scale"]) != 1.0:
                    log.warning("%s: model failed at full scale; masks made at scale %.2f", image_id, row["scale"])
            else:
                quarantine.add(source.ref(image_id).uri, str(row["reason"]), STAGE)
                summary["quarantined"] += 1
            arrivals.append((time.perf_counter() - start, len(records) if status == "ok" else 0))
            actor_s, actor_cpu_s = actor_s + float(row["seconds"]), actor_cpu_s + float(row["cpu_seconds"])
            since_commit += 1
            if since_commit >= a.images_per_commit:
                writer.commit()
                summary["commits"] += 1
                since_commit = 0
            progress.advance(summary["images"], summary["masks"], time.perf_counter() - start)
        if since_commit:
            writer.commit()
            summary["commits"] += 1
    seconds = time.perf_counter() - start
    summary.update(seconds=round_(seconds), images_per_s=round_(summary["images"] / max(seconds, 1e-9)),
                   masks_per_image=round_(summary["masks"] / max(summary["images"], 1)),
                   actor_s_per_image=round_(actor_s / max(len(arrivals), 1)),
                   actor_cpu_s_per_image=round_(actor_cpu_s / max(len(arrivals), 1)),
                   **steady_rates(arrivals, num_actors))
    return summary


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
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
