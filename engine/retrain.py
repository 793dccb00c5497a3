"""A round's retraining step: the model fine-tuned on every verified mask collected so far.

The round loop (engine/rounds.py) and `sa-engine train` call this module; it turns the configuration into
model/train.py's plain arguments (a data sampler and `TrainSettings`) and runs `model.train.train` in-process or
on Ray Train workers (engine/integrations/cluster.py). A worker rebuilds its data from the configuration through
engine/integrations/runtime.py, so the storage and image settings reach training as they reach the stages.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import ray.train
import torch
from torch.nn import functional as F

from engine.integrations import runtime
from engine.integrations.cluster import cpus_per_train_worker, fit_torch_trainer
from engine.integrations.config import EngineConfig
from engine.integrations.synth import synthetic_sampler
from model.checkpoints import PRESETS, trained_steps
from model.evaluate import load_coco_folder
from model.segmenter import Segmenter
from storage.datasets import MaskShardDataset
from storage.images import BadImage
from storage.rle import decode_rles
from model.train import Sampler, TrainSettings, buffered_sampler, dataset_sampler, train

log = logging.getLogger(__name__)

# Peak rate when a round fine-tunes a trained model: a quarter of the from-scratch rate. Fine-tuning the
# demo's bootstrapped model (holdout mIoU@1 0.533) for 200 steps on its rounds' masks: Muon at 1e-3 /
# 2e-3 / 4e-3 / 8e-3 -> 0.554 / 0.565 / 0.560 / 0.531 (AdamW at 1e-3 / 4e-3: 0.568 / 0.541).
FINE_TUNE_LR = 2e-3


# ---- what a round trains on ---------------------------------------------------------------------

def training_sets(cfg: EngineConfig) -> list[dict]:
    """What a round retrains on: every verified mask in the run's store (human masks weighted by
    `train.manual_weight`) plus, when the run was bootstrapped, the bootstrap set at weight 1 — SAM
    retrained on everything collected so far; a few dozen new masks alone over-fit (measured: holdout
    1-click mIoU 0.43 -> 0.30 after 1.5 min on 26 masks). Each set: root (store), images (source),
    manual_weight, filters; paths absolute, so a Ray Train worker reads the same data."""
    main = {"root": cfg.path(cfg.storage.root), "images": cfg.path(cfg.images.source),
            "manual_weight": cfg.train.manual_weight, "filters": {"verified": True}}
    sets = [main]
    boot = Path(cfg.path("bootstrap"))
    if (cfg.train.include_bootstrap and (boot / "store" / "manifest.json").is_file()
            and Path(main["root"]).resolve() != (boot / "store").resolve()):
        sets.append({"root": str(boot / "store"), "images": str(boot / "data" / "images"),
                     "manual_weight": 1.0, "filters": {"verified": True}})
    return sets


def store_scenes(cfg: EngineConfig, sets: list[dict]) -> Iterator[tuple]:
    """One pass over the training sets as scenes for `buffered_sampler`: per image and shard (storage.datasets'
    `MaskShardDataset`, split over Ray Train ranks), (key, image as the image source loads it (downscaled to
    `images.max_side`), masks (N, H, W) bool at the image's size, weights: `manual_weight` for human-made masks,
    1 for others). Images the source does not list or cannot read are skipped."""
    for number, d in enumerate(sets):
        source = runtime.image_source(cfg, d["images"])
        listed = {r.image_id: r for r in source.list()}
        data = MaskShardDataset(runtime.mask_store(cfg, d["root"]), per="image", decode=False,
                                **d.get("filters", {"verified": True}))
        for sample in data:
            ref = listed.get(sample["image_id"])
            if ref is None:
                continue
            try:
                image = source.load(ref).pixels
            except BadImage as e:
                log.warning("training: skipping %s: %s", sample["image_id"], e)
                continue
            masks = decode_rles(sample["rles"])
            if masks.shape[1:] != image.shape[:2]:
                t = F.interpolate(torch.from_numpy(masks[:, None].astype(np.float32)), image.shape[:2], mode="nearest")
                masks = t[:, 0].numpy() > 0.5
            human = np.array([o in ("manual", "prefill_edited", "manual_added") for o in
                              (o or s for o, s in zip(sample["origins"], sample["stages"]))])
            weights = np.where(human, d.get("manual_weight", 2.0), 1.0).astype(np.float32)
            yield (number, sample["image_id"]), image, masks, weights


def training_fingerprint(cfg: EngineConfig, sets: list[dict]) -> str:
    """The data a round trains on, from the manifests alone (the committed shards' sha256 and the filters)."""
    parts = []
    for d in sets:
        shards = sorted(s.sha256 for s in runtime.mask_store(cfg, d["root"]).shards())
        parts.append(json.dumps([d.get("filters", {}), d.get("manual_weight"), shards], sort_keys=True))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def store_sampler(cfg: EngineConfig, sets: list[dict]) -> tuple[Sampler, str]:
    """The round's training data streamed from the store, `train.buffer_images` scenes in memory per worker."""
    return buffered_sampler(lambda: store_scenes(cfg, sets), cfg.train.buffer_images), training_fingerprint(cfg, sets)


def folder_or_synthetic(folder: str | None) -> tuple[Sampler, str]:
    """A synth-style folder (images/ + annotations.json), or fresh synthetic scenes when None."""
    if folder is None:
        return synthetic_sampler(256), "synthetic-stream"
    _, images, masks, _ = load_coco_folder(folder)
    digest = hashlib.sha256((Path(folder) / "annotations.json").read_bytes()).hexdigest()[:16]
    return dataset_sampler(images, masks), digest


def sampler_for(data: dict) -> tuple[Sampler, str]:
    """data: {"kind": "synthetic", "size": S} | {"kind": "folder", "folder"} | {"kind": "store", "config"
    (EngineConfig as a dict), "sets"} -> (sampler, data fingerprint)."""
    kind = data.get("kind", "synthetic")
    if kind == "folder":
        return folder_or_synthetic(data["folder"])
    if kind == "store":
        return store_sampler(EngineConfig.model_validate(data["config"]), data["sets"])
    return synthetic_sampler(data.get("size", 256)), "synthetic"


def training_precision(cfg: EngineConfig) -> str:
    """`model.precision` for training: bf16 as configured; fp16 trains as bf16 (the recipe has no loss scaling)."""
    return "bf16" if cfg.model.precision == "fp16" else cfg.model.precision


def _start_model(init: str, seed: int | None = 0) -> Segmenter:
    return Segmenter.new(init, seed=seed) if init in PRESETS else Segmenter.load(init)


# ---- Ray Train -----------------------------------------------------------------------------------

def ray_train_loop(config: dict) -> None:
    """Ray Train worker loop. config: settings (dict of TrainSettings), init (a preset name or a checkpoint
    path to resume from), data (see sampler_for), metadata (dict). Reports metrics and, from rank 0, a
    checkpoint directory in our format."""
    settings = TrainSettings(**config.get("settings", {}))
    settings.threads = settings.threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    init = config.get("init", "compact")
    seg = _start_model(init, config.get("seed", 0)).run_as(config.get("precision", "fp32"))
    sampler, fingerprint = sampler_for(config.get("data", {"kind": "synthetic"}))
    result = train(seg, sampler, settings)
    metrics = train_metrics(result)
    meta = dict(config.get("metadata", {}), data_fingerprint=fingerprint, train=metrics,
                resumed_from=None if init in PRESETS else str(init))
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            seg.save(d, meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def train_with_ray(settings: TrainSettings, init: str, data: dict, out_dir: str | Path, storage_path: str | Path,
                   num_workers: int = 1, use_gpu: bool = False, metadata: dict | None = None,
                   name: str = "sa-engine-train", seed: int | None = 0,
                   precision: str = "fp32") -> tuple[Segmenter, dict]:
    """Run `ray_train_loop` on Ray Train and copy the checkpoint to out_dir (the JSON last: the commit point)."""
    cpus = cpus_per_train_worker(num_workers)
    settings = replace(settings, threads=settings.threads or cpus)
    cfg = {"settings": asdict(settings), "init": str(init), "data": data, "metadata": metadata or {}, "seed": seed,
           "precision": precision}
    result = fit_torch_trainer(ray_train_loop, cfg, num_workers=num_workers, use_gpu=use_gpu,
                               storage_path=storage_path, name=name, cpus_per_worker=cpus)
    if result.error is not None:
        raise RuntimeError(f"ray train: {result.error}".splitlines()[0])
    if result.checkpoint is None:
        raise RuntimeError("ray train: finished without a checkpoint")
    out = Path(out_dir)
    with result.checkpoint.as_directory() as d:
        out.mkdir(parents=True, exist_ok=True)
        for fname in ("model.safetensors", "sa_engine.json"):
            shutil.copy2(Path(d) / fname, out / f".{fname}.tmp")
            os.replace(out / f".{fname}.tmp", out / fname)
    return Segmenter.load(out), dict(result.metrics or {})


# ---- the two callers -----------------------------------------------------------------------------

def train_metrics(result) -> dict:
    """What a training run reports (its checkpoint's metadata, the ledger, the report): steps trained and
    planned, what stopped it, seconds, the last loss."""
    return {"steps": result.steps, "planned_steps": result.planned_steps, "stopped_by": result.stopped_by,
            "train_seconds": round(result.train_seconds, 1), "cpu_seconds": round(result.cpu_seconds, 1),
            "loss": result.final_loss}


def short_note(metrics: dict, guard: str) -> str | None:
    """One line when training stopped before its planned steps, else None."""
    steps, planned = metrics.get("steps"), metrics.get("planned_steps")
    if steps is None or planned is None or steps >= planned:
        return None
    return (f"trained {steps} of {planned} steps (stopped by the wall-clock guard {guard}): the model and the "
            f"round's figures are not comparable with a full-budget run")


def round_settings(cfg: EngineConfig, init_checkpoint: str | None, round_no: int) -> tuple[TrainSettings, int | None]:
    """A round's TrainSettings from `train.*` (None keys: the recipe's defaults; a trained starting model gets the
    fine-tune rate) and the starting model's steps so far (None: weights of unknown history)."""
    # threads None: every CPU (Ray Train: the worker's share of the cluster's CPUs)
    settings = TrainSettings(max_steps=cfg.train.steps, minutes=cfg.train.minutes, seed=cfg.seed + round_no,
                             threads=None)
    steps_before = trained_steps(init_checkpoint) if init_checkpoint else 0
    if steps_before != 0:  # a trained model (None: real weights of unknown history)
        settings.lr = FINE_TUNE_LR
    for name in ("lr", "batch_images", "crop_share", "optimizer"):  # None: the recipe's default
        if getattr(cfg.train, name) is not None:
            setattr(settings, name, getattr(cfg.train, name))
    settings.parts = cfg.train.parts
    if cfg.train.prompts_per_mask is not None:
        settings.iterations = cfg.train.prompts_per_mask
    return settings, steps_before


def train_round(cfg: EngineConfig, init_checkpoint: str | None, out_dir: str | Path, round_no: int) -> dict:
    """Fine-tune `init_checkpoint` (None: a fresh seeded `model.preset`) on every verified mask in the shard
    store (training_sets), for `train.steps` optimiser steps (`train.minutes`, if set, a guard that may stop it
    earlier); on Ray Train (`train.num_workers` workers) when `train.use_ray`, else in-process.

    Returns {checkpoint, metrics, minutes, masks, sets, steps, planned_steps, short, note?}: `short` when the
    guard stopped training before its steps, with a `note` saying so in one line. With no verified mask yet,
    the starting model is saved unchanged (a round that collected nothing cannot change the model).
    """
    t0 = time.perf_counter()
    guard_key = f"train.minutes = {cfg.train.minutes:g}" if cfg.train.minutes else "train.minutes"
    n_masks = runtime.mask_store(cfg).read_table(columns=["mask_id"], verified=True).num_rows
    settings, steps_before = round_settings(cfg, init_checkpoint, round_no)
    meta = {"round": round_no, "resumed_from": init_checkpoint, "steps_before": steps_before or 0,
            "lr": settings.lr, "optimizer": settings.optimizer}
    init = init_checkpoint or cfg.model.preset
    if n_masks == 0:
        _start_model(init, cfg.seed).save(out_dir, dict(meta, data_fingerprint="empty", train={"steps": 0}))
        return {"checkpoint": str(out_dir), "metrics": {"steps": 0}, "masks": 0, "steps": 0, "planned_steps": 0,
                "short": False, "minutes": round((time.perf_counter() - t0) / 60, 2),
                "note": "no verified masks: model unchanged"}
    sets = training_sets(cfg)
    if cfg.train.use_ray:
        data = {"kind": "store", "config": cfg.model_dump(), "sets": sets}
        _, metrics = train_with_ray(settings, init, data, out_dir, Path(cfg.workdir).resolve() / "ray-train",
                                    num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, metadata=meta,
                                    name=f"round-{round_no}", seed=cfg.seed, precision=training_precision(cfg))
    else:
        settings.threads = os.cpu_count() or 1
        seg = _start_model(init, cfg.seed).run_as(training_precision(cfg))
        sampler, fingerprint = store_sampler(cfg, sets)
        result = train(seg, sampler, settings)
        metrics = train_metrics(result)
        seg.save(out_dir, dict(meta, data_fingerprint=fingerprint, train=metrics))
    out = {"checkpoint": str(out_dir), "metrics": metrics, "masks": n_masks, "sets": len(sets),
           "minutes": round((time.perf_counter() - t0) / 60, 2), "steps": metrics.get("steps"),
           "planned_steps": settings.max_steps}
    note = short_note({**metrics, "planned_steps": settings.max_steps}, guard_key)
    out["short"] = note is not None
    if note:
        out["note"] = note
    return out


def train_cli(out: str | Path, init: str, data_folder: str | None, steps: int, minutes: float | None,
              round_no: int, use_ray: bool, workers: int, seed: int) -> dict:
    """`sa-engine train`: from scratch or from a checkpoint, on a synth-style folder or fresh synthetic scenes,
    for `steps` optimiser steps (`minutes`: an optional wall-clock guard)."""
    settings = TrainSettings(max_steps=steps, minutes=minutes, seed=seed, threads=1)
    meta = {"round": round_no}
    if use_ray:
        data = ({"kind": "synthetic", "size": 256} if data_folder is None
                else {"kind": "folder", "folder": str(Path(data_folder).resolve())})
        seg, metrics = train_with_ray(settings, init, data, out, Path(out).resolve().parent / ".ray-train",
                                      num_workers=workers, metadata=meta, seed=seed)
        return {"model_version": seg.model_version, "out": str(out), **metrics}
    seg = _start_model(init, seed)
    sampler, fingerprint = folder_or_synthetic(data_folder)
    result = train(seg, sampler, settings)
    metrics = train_metrics(result)
    version = seg.save(out, dict(meta, data_fingerprint=fingerprint, train=metrics,
                                 resumed_from=None if init in PRESETS else str(init)))
    return {"model_version": version, "out": str(out), **metrics}
