"""The data engine's round loop and its ledger.

Rounds as SA-1B ran them: the assisted-manual stage for `stages.manual.rounds` rounds, the
semi-automatic stage for `stages.semi.rounds` rounds, then the fully automatic stage over the
remaining (or all) images with the final model. After every manual/semi round the model is
retrained from the current checkpoint on all verified masks so far, evaluated on the frozen
holdout, and promoted only if it beats the current model on the primary metric
(`eval.promote_metric`, holdout 1-click mIoU by default) by more than the holdout's noise: the paired
bootstrap interval of the per-mask differences must lie above `eval.promote_min_delta`
(`eval.promote_confidence`); otherwise the current model is kept and the ledger says why, with the interval.

The ledger (`<workdir>/ledger.jsonl`) holds one JSON line per step: its inputs, outputs, timing
and status. It is rewritten atomically (temp + fsync + rename) after every change, so a crash,
Ctrl-C or SIGKILL leaves either the old or the new ledger, never a torn one. A rerun walks the
same plan, takes the outputs of every `done` step from the ledger, and resumes at the first step
that is not done; a committed step is never run twice.

The loop takes its step functions as parameters (`Steps`); the defaults call the real stages,
trainer and evaluator, and tests pass cheap real functions.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.integrations import runtime
from engine.integrations.config import EngineConfig
from engine.integrations.synth import write_synthetic_dataset
from engine.retrain import train_round
from model.amg import generate_masks
from model.evaluate import evaluate_checkpoint
from model.segmenter import Segmenter
from stages.auto import run_auto_stage
from stages.manual import run_manual_stage
from stages.review import run_review_stage
from stages.semi import run_semi_stage
from model.uncertainty import image_uncertainty
from storage.coco import CocoImage, read_coco, rle_annotation, segmentation_rle, write_coco
from storage.images import BadImage, image_id_from_key
from storage.records import MaskRecord, make_mask_id

LEDGER_FILE = "ledger.jsonl"
LEDGER_VERSION = 1
DONE, STARTED, FAILED, INTERRUPTED = "done", "started", "failed", "interrupted"


class LedgerError(RuntimeError):
    """The ledger can't be used as it is (corrupt, locked, or disagrees with the plan); one line."""


class StepFailed(RuntimeError):
    """A step raised; the message is one line naming the step and the reason."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars/arrays, paths, sets and tuples turned into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no NaN/inf; the report shows a missing value
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}" if not isinstance(e, (ValueError, RuntimeError, OSError)) else text


class Ledger:
    """The round ledger: an ordered list of step records kept in one JSON-lines file.

    Record fields: step (id, e.g. "r2.train"), kind (select|manual|semi|auto|train|eval|promote|
    init|bootstrap), round, status (started|done|failed|interrupted), inputs, outputs, error,
    attempts, started_at, finished_at (ISO UTC), seconds (wall time of the last attempt).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LedgerError(f"{self.path}:{n}: not valid JSON ({e.msg})") from None
                if "step" not in rec or "status" not in rec:
                    raise LedgerError(f"{self.path}:{n}: a ledger line needs 'step' and 'status'")
                self._records[rec["step"]] = rec

    def entries(self) -> list[dict]:
        return list(self._records.values())

    def get(self, step: str) -> dict | None:
        return self._records.get(step)

    def is_done(self, step: str) -> bool:
        rec = self._records.get(step)
        return rec is not None and rec["status"] == DONE

    def begin(self, step: str, kind: str, round: int, inputs: dict) -> None:
        prev = self._records.get(step, {})
        self._records[step] = {
            "step": step, "kind": kind, "round": round, "status": STARTED,
            "inputs": _jsonable(inputs), "outputs": None, "error": None,
            "attempts": prev.get("attempts", 0) + 1, "started_at": _now(), "finished_at": None,
            "seconds": None,
        }
        self._write()

    def finish(self, step: str, outputs: dict, seconds: float) -> dict:
        """Commit a step; returns the outputs as stored (JSON round-tripped)."""
        stored = json.loads(json.dumps(_jsonable(outputs)))
        self._records[step].update(status=DONE, outputs=stored, finished_at=_now(),
                                   seconds=round(seconds, 3))
        self._write()
        return stored

    def fail(self, step: str, error: str, seconds: float, status: str = FAILED) -> None:
        self._records[step].update(status=status, error=error, finished_at=_now(),
                                   seconds=round(seconds, 3))
        self._write()

    def _write(self) -> None:
        """Replace the file atomically: write a temp file beside it, fsync, rename, fsync the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in self._records.values())
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class WorkdirLock:
    """An exclusive lock on a work dir, so two runs never write one ledger (released by the OS on kill)."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / ".sa-engine.lock"
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LedgerError(f"{self.path.parent}: another sa-engine run is using this work dir "
                              f"(pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --- the real step functions (defaults) -------------------------------------------------------

def default_list_images(cfg: EngineConfig) -> list[str]:
    """The image ids of the configured source, sorted (the holdout is a separate source)."""
    return sorted(ref.image_id for ref in runtime.image_source(cfg).list())


def default_init_model(cfg: EngineConfig, out_dir: str) -> dict:
    """The starting model: the configured checkpoint as it is, else a fresh seeded preset saved once.

    Saving the fresh model makes every later step (stage, eval, training) see the same weights.
    """
    if cfg.model.checkpoint:
        return {"checkpoint": cfg.path(cfg.model.checkpoint), "source": "config"}
    seg = Segmenter.new(preset=cfg.model.preset, seed=cfg.seed)
    version = seg.save(out_dir, metadata={"round": 0, "source": f"fresh {cfg.model.preset}", "seed": cfg.seed})
    return {"checkpoint": out_dir, "source": f"fresh {cfg.model.preset}", "model_version": version}


def default_bootstrap(cfg: EngineConfig, checkpoint: str | None, out_dir: str) -> dict:
    """Round 0: train the starting model for `model.bootstrap_steps` optimiser steps on a separate labelled
    synthetic set (its own seed, never the run's images or holdout), as SAM started from a model
    trained on public data. The set's ground truth goes into its own shard store, and training
    uses the same `train_round` as later rounds. Returns train_round's summary.
    """
    root = Path(cfg.path("bootstrap"))
    data = root / "data"
    if not (data / "annotations.json").exists():
        write_synthetic_dataset(data, n_images=cfg.model.bootstrap_images, seed=cfg.model.bootstrap_seed,
                                size=cfg.model.bootstrap_image_size, family=cfg.model.bootstrap_family)
    store_uri = str(root / "store")
    store = runtime.mask_store(cfg, store_uri)
    if not store.images_done("manual", round=0):
        with store.writer(stage="manual", round=0, model_version=None) as w:
            for im in read_coco(data / "annotations.json"):
                image_id = image_id_from_key(im.file_name)
                rles = [segmentation_rle(a["segmentation"], im.height, im.width) for a in im.annotations]
                w.add([MaskRecord.from_rle(image_id, make_mask_id(image_id, "bootstrap", a["id"]), rle, "manual", 0,
                                           origin="manual", annotator="bootstrap-ground-truth", verified=True)
                       for a, rle in zip(im.annotations, rles)])
                w.image_done(image_id, len(rles))
            w.commit()
    boot_cfg = cfg.model_copy(deep=True)
    boot_cfg.images.source = str(data / "images")
    boot_cfg.images.ground_truth = str(data / "annotations.json")
    boot_cfg.storage.root = store_uri
    boot_cfg.storage.s3_endpoint_url = None
    boot_cfg.train.steps = cfg.model.bootstrap_steps
    boot_cfg.train.minutes = cfg.model.bootstrap_minutes
    out = train_round(boot_cfg, checkpoint, out_dir, 0)
    if out.get("note"):
        out["note"] = out["note"].replace("train.minutes", "model.bootstrap_minutes")
    return out


def default_general_holdout(cfg: EngineConfig) -> dict:
    """A general holdout carved from the starting set: `model.bootstrap_general_holdout` scenes of the bootstrap's
    family and size with a seed of their own (disjoint from the scenes it trained on), written once under
    <workdir>/bootstrap/general. Returns {source, ground_truth, images}."""
    folder = Path(cfg.path("bootstrap")) / "general"
    if not (folder / "annotations.json").exists():
        write_synthetic_dataset(folder, n_images=cfg.model.bootstrap_general_holdout, seed=cfg.model.bootstrap_seed + 1,
                                size=cfg.model.bootstrap_image_size, family=cfg.model.bootstrap_family)
    return {"source": str(folder / "images"), "ground_truth": str(folder / "annotations.json"),
            "images": cfg.model.bootstrap_general_holdout}


def default_manual(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str]) -> dict:
    return run_manual_stage(cfg, round, checkpoint, image_ids=image_ids, simulate=cfg.stages.simulate).to_dict()


def default_semi(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str]) -> dict:
    return run_semi_stage(cfg, round, checkpoint, image_ids=image_ids, simulate=cfg.stages.simulate).to_dict()


def default_holdout(cfg: EngineConfig, checkpoint: str | None, image_ids: list[str]) -> dict:
    """The frozen holdout drawn by people: `image_ids` (carved out of `images.source`) are annotated as a manual
    round in a Label Studio project of their own ("holdout r0 …"), their masks kept in a store of their own
    (<workdir>/holdout/store: never read by training), then written as <workdir>/holdout/images/ +
    annotations.json (COCO RLE), which promotion reads exactly as a holdout the user brings."""
    folder = Path(cfg.path("holdout"))
    hold_cfg = cfg.model_copy(deep=True)
    hold_cfg.storage.root = str(folder / "store")
    summary = run_manual_stage(hold_cfg, 0, checkpoint, image_ids=image_ids, simulate=cfg.stages.simulate,
                               purpose="holdout")
    written = write_holdout_folder(runtime.mask_store(hold_cfg), runtime.image_source(cfg), image_ids, folder)
    if written["masks"] == 0:
        raise ValueError(f"holdout: no masks were drawn on its {len(image_ids)} images (Label Studio project "
                         f"{summary.ls_project_id}); annotate them and rerun")
    return {**written, "ls_project_id": summary.ls_project_id,
            **holdout_completeness(cfg, checkpoint, folder, image_ids)}


def holdout_completeness(cfg: EngineConfig, checkpoint: str | None, folder: Path, image_ids: list[str]) -> dict:
    """How complete the drawn holdout is, as far as the engine can tell: images with no mask; with ground truth
    (simulation), the objects it holds against the masks drawn; else the automatic generator's count of objects
    on each image (the model in use) against the masks drawn. Returns {per_image: {image_id: drawn},
    truth_masks (or None), warnings: [one line each]} (warnings only: people may have reasons)."""
    drawn = {i: 0 for i in image_ids}
    for im in read_coco(folder / "annotations.json"):
        drawn[im.file_name] = drawn.get(im.file_name, 0) + len(im.annotations)
    warnings = [f"holdout image {i}: no mask drawn (it is left out of the holdout)" for i, n in drawn.items() if n == 0]
    truth_masks = None
    if cfg.stages.simulate and cfg.images.ground_truth:
        truth = runtime.ground_truth(cfg)
        truth_masks = sum(len(truth.get(i, [])) for i in image_ids)
        for i in image_ids:
            if drawn[i] < len(truth.get(i, [])):
                warnings.append(f"holdout image {i}: {drawn[i]} of its {len(truth.get(i, []))} objects drawn")
    else:
        seg, source = runtime.segmenter(cfg, checkpoint), runtime.image_source(cfg)
        params = runtime.amg_params(cfg.stages.auto, points_per_side=min(16, cfg.stages.auto.points_per_side))
        for i in image_ids:
            try:
                image = source.load(source.ref(i))
            except BadImage:
                continue
            found = len(generate_masks(seg, image.pixels, params, output_size=image.original_size))
            if drawn[i] and found >= 1.5 * drawn[i] and found - drawn[i] >= 3:
                warnings.append(f"holdout image {i}: {drawn[i]} masks drawn, the automatic generator finds "
                                f"{found} objects: were some left out? (every object must be drawn)")
    return {"per_image": drawn, "truth_masks": truth_masks, "warnings": warnings}


def write_holdout_folder(store, source, image_ids: list[str], folder: Path) -> dict:
    """`folder`/images/ (the files, copied) and `folder`/annotations.json (COCO, RLE counts as str, sizes of the
    files) from the verified masks in `store`; images nobody drew on are left out. Returns {source,
    ground_truth, images, masks}."""
    records: dict[str, list[MaskRecord]] = {}
    for rec in store.iter_records(image_ids=image_ids, verified=True):
        records.setdefault(rec.image_id, []).append(rec)
    images, ann_id = [], 0
    for number, image_id in enumerate(sorted(records), 1):
        target = folder / "images" / image_id
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read(source.ref(image_id)))
        h, w = records[image_id][0].height, records[image_id][0].width
        anns = [rle_annotation(ann_id + k + 1, number, rec.rle) for k, rec in enumerate(records[image_id])]
        ann_id += len(anns)
        images.append(CocoImage(number, image_id, h, w, anns))
    counts = write_coco(folder / "annotations.json", images)
    return {"source": str(folder / "images"), "ground_truth": str(folder / "annotations.json"), **counts}


def default_review(cfg: EngineConfig, round: int, checkpoint: str | None) -> dict:
    return run_review_stage(cfg, round, checkpoint, simulate=cfg.stages.simulate).to_dict()


def default_auto(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str]) -> dict:
    return run_auto_stage(cfg, round, checkpoint, image_ids=image_ids).to_dict()


def default_train(cfg: EngineConfig, init_checkpoint: str | None, out_dir: str, round: int) -> dict:
    return train_round(cfg, init_checkpoint, out_dir, round)


def default_evaluate(cfg: EngineConfig, checkpoint: str | None) -> dict:
    """The holdout evaluation; with a general holdout (images.general_holdout_*), its evaluation under "general"
    (click and box metrics only: it guards against forgetting, the automatic AP is not needed there)."""
    out = evaluate_checkpoint(checkpoint, cfg.path(cfg.images.holdout_source),
                              cfg.path(cfg.images.holdout_ground_truth), clicks=tuple(cfg.eval.clicks),
                              max_objects=cfg.eval.max_objects)
    if cfg.images.general_holdout_source:
        out["general"] = evaluate_checkpoint(checkpoint, cfg.path(cfg.images.general_holdout_source),
                                             cfg.path(cfg.images.general_holdout_ground_truth),
                                             clicks=tuple(cfg.eval.clicks), amg_points_per_side=None,
                                             max_objects=cfg.eval.max_objects)
    return out


def default_select(cfg: EngineConfig, round: int, checkpoint: str | None, candidates: list[str], used: set[str],
                   count: int | None, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """The next round's images. `stages.select` "random": select_images. "uncertain": a seeded random sample of
    up to `stages.select_pool` unannotated images is scored by the current model (model/uncertainty.py) and the
    `count` it is least sure of are taken; an image that can't be read is left out, with a line."""
    if cfg.stages.select == "random" or count is None:
        return {"image_ids": select_images(candidates, used, count, cfg.seed, round), "candidates": len(candidates)}
    pool = select_images(candidates, used, max(count, cfg.stages.select_pool), cfg.seed, round)
    seg = runtime.segmenter(cfg, checkpoint)
    source = runtime.image_source(cfg)
    scores: dict[str, float] = {}
    for image_id in pool:
        try:
            loaded = source.load(source.ref(image_id))
        except BadImage as e:
            progress(f"r{round}.select: {image_id}: left out ({e})")
            continue
        scores[image_id] = image_uncertainty(seg, loaded.pixels)["score"]
    # Ties (a young model's doubt saturates at 1 on every image) are broken by a seeded shuffle, not by name.
    shuffled = {i: k for k, i in enumerate(np.random.default_rng([cfg.seed, round, 1]).permutation(sorted(scores)))}
    ranked = sorted(scores, key=lambda i: (-scores[i], shuffled[i]))
    chosen = ranked[:count]
    return {"image_ids": sorted(chosen), "candidates": len(candidates), "scored": len(scores),
            "uncertainty": {i: float(np.round(scores[i], 4)) for i in sorted(chosen)},  # (`round` is the round)
            "pool_uncertainty": float(np.round(np.mean(list(scores.values())), 4)) if scores else None}


@dataclass
class Steps:
    """What the loop calls. Signatures:
    list_images(cfg) -> [image_id];  init_model(cfg, out_dir) -> {checkpoint};
    select(cfg, round, checkpoint, candidates, used, count, progress) -> {image_ids, candidates};
    bootstrap(cfg, checkpoint, out_dir) -> {checkpoint, metrics, steps, planned_steps, short, note?};
    general_holdout(cfg) -> {source, ground_truth, images} (after a bootstrap, with no general holdout given);
    holdout(cfg, checkpoint, image_ids) -> {source, ground_truth, images, masks};
    manual/semi/auto(cfg, round, checkpoint, image_ids) -> stage summary;
    review(cfg, round, checkpoint) -> review summary (after a semi round, with stages.review.enabled);
    train(cfg, init_checkpoint, out_dir, round) -> {checkpoint, metrics, minutes};
    evaluate(cfg, checkpoint) -> {"miou@1": …, …}.
    """

    list_images: Callable[[EngineConfig], list[str]] = default_list_images
    select: Callable[..., dict] = default_select
    init_model: Callable[[EngineConfig, str], dict] = default_init_model
    bootstrap: Callable[[EngineConfig, str | None, str], dict] = default_bootstrap
    general_holdout: Callable[[EngineConfig], dict] = default_general_holdout
    holdout: Callable[[EngineConfig, str | None, list[str]], dict] = default_holdout
    manual: Callable[[EngineConfig, int, str | None, list[str]], dict] = default_manual
    semi: Callable[[EngineConfig, int, str | None, list[str]], dict] = default_semi
    review: Callable[[EngineConfig, int, str | None], dict] = default_review
    auto: Callable[[EngineConfig, int, str | None, list[str]], dict] = default_auto
    train: Callable[[EngineConfig, str | None, str, int], dict] = default_train
    evaluate: Callable[[EngineConfig, str | None], dict] = default_evaluate


# --- the plan and the loop --------------------------------------------------------------------

def stage_of_round(cfg: EngineConfig, round: int) -> str:
    """Rounds 1..N1 are manual, N1+1..N1+N2 semi, N1+N2+1 is the automatic stage."""
    n1, n2 = cfg.stages.manual.rounds, cfg.stages.semi.rounds
    return "manual" if round <= n1 else "semi" if round <= n1 + n2 else "auto"


def select_images(candidates: list[str], used: set[str], count: int | None, seed: int, round: int) -> list[str]:
    """Pick `count` (None: all) unused ids, deterministic: a seeded shuffle of the sorted candidates,
    so consecutive rounds don't take alphabetically adjacent (often similar) images. Sorted result."""
    pool = [i for i in sorted(set(candidates)) if i not in used]
    if count is None:
        return pool
    order = np.random.default_rng([seed, round]).permutation(len(pool))
    return sorted(pool[i] for i in order[:count])


def paired_interval(candidate: list[float], current: list[float], confidence: float, resamples: int = 4000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences candidate - current (one per holdout mask) and its two-sided percentile
    bootstrap interval at `confidence`: (mean, low, high)."""
    d = np.asarray(candidate, np.float64) - np.asarray(current, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def metric_label(metric: str | dict[str, float]) -> str:
    """The promote metric as shown: its name, or the weighted mix ("0.5 miou@1 + 0.5 box_miou")."""
    if isinstance(metric, str):
        return metric
    total = sum(metric.values())
    return " + ".join(f"{w / total:.2g} {name}" for name, w in metric.items() if w > 0)


def metric_scores(evaluation: dict, metric: str | dict[str, float]) -> tuple[float | None, list[float] | None]:
    """An evaluation's score on `metric` (a name, or {name: weight}: the weighted mean) and its per-mask
    scores (None when the metric has none, e.g. AP). A mix needs every part per mask."""
    weights = {metric: 1.0} if isinstance(metric, str) else {k: float(w) for k, w in metric.items() if w > 0}
    total = sum(weights.values())
    if any(evaluation.get(k) is None for k in weights):
        return None, None
    score = sum(w * evaluation[k] for k, w in weights.items()) / total
    per = evaluation.get("per_mask") or {}
    if any(not per.get(k) for k in weights) or len({len(per[k]) for k in weights}) != 1:
        return score, None
    per_mask = (sum(w * np.asarray(per[k], np.float64) for k, w in weights.items()) / total).tolist()
    return score, per_mask


FORGETTING = ("weigh", "block", "report")


def promotion_decision(metric: str | dict[str, float], candidate: dict, current: dict | None, min_delta: float,
                       confidence: float = 0.95, general_max_drop: float | None = None, start: dict | None = None,
                       forgetting: str = "weigh", forgetting_share: float = 0.25) -> dict:
    """Promote only if the candidate is better than the current model on `metric` by more than `min_delta`,
    and (with a general holdout) does not forget the starting domain beyond what the policy allows.

    `metric`: a holdout metric's name, or {name: weight} for a weighted mix of per-mask metrics. With both
    models' per-mask scores on the holdout (`per_mask`, the same masks in the same order) and `confidence` > 0,
    "better" is the paired test: the lower end of the bootstrap interval of the mean per-mask difference must
    exceed `min_delta`, so a difference the holdout cannot tell from noise is not promoted. Otherwise (an AP
    metric, or confidence 0) the plain difference of the means decides.

    Forgetting is measured whenever the evaluations hold a `general` evaluation (a general holdout of the
    starting domain): against the model in use, and cumulatively against the starting model (`start`, the
    round-0 evaluation), so drops within the allowance cannot add up round after round. `forgetting` says what
    a fall does: "weigh" refuses a fall larger than max(`general_max_drop`, `forgetting_share` x the
    candidate's gain on the holdout) — a large gain on the user's own images is not thrown away for a small
    loss on the starting domain; "block" refuses any fall beyond `general_max_drop`; "report" never refuses.
    `general_max_drop` None: the old switch for no guard (as "report").
    Returns {promoted, metric, candidate, current, delta, interval, test, general, reason}; `current` None
    promotes.
    """
    if forgetting not in FORGETTING:
        raise ValueError(f"forgetting: {forgetting!r} is not one of {FORGETTING}")
    label = metric_label(metric)
    cand, a = metric_scores(candidate, metric)
    if cand is None:
        raise StepFailed(f"promote: the evaluation has no '{label}' (has: "
                         f"{', '.join(sorted(k for k in candidate if k not in ('per_mask', 'general')))})")
    cur, b = (None, None) if current is None else metric_scores(current, metric)
    if cur is None:
        return {"promoted": True, "metric": label, "candidate": cand, "current": None, "general": None,
                "reason": f"no score for the current model; candidate {label} {cand:.4f}"}
    if confidence > 0 and a and b and len(a) == len(b):
        delta, low, high = paired_interval(a, b, confidence)
        promoted = low > min_delta
        interval, test = [round(low, 4), round(high, 4)], f"paired bootstrap over {len(a)} holdout masks"
        shown = f"{delta:+.4f}, {confidence:.0%} interval [{low:+.4f}, {high:+.4f}]"
    else:
        delta = cand - cur
        promoted, interval, test = delta > min_delta, None, "difference of means"
        shown = f"{delta:+.4f}"
    general = _forgetting(metric, candidate, current, start, cand, cur,
                          "report" if general_max_drop is None else forgetting, general_max_drop or 0.0,
                          forgetting_share)
    if promoted and general is not None and not general["ok"]:
        promoted = False
        reason = (f"kept current model: candidate {label} {cand:.4f} beats current {cur:.4f} ({shown}) but forgets "
                  f"the general holdout: {general['why']}")
    elif promoted:
        reason = f"candidate {label} {cand:.4f} beats current {cur:.4f} ({shown})"
    else:
        reason = (f"kept current model: candidate {label} {cand:.4f} vs current {cur:.4f} is not better by "
                  f"more than {min_delta:g} ({shown})")
    if general is not None and promoted:
        reason += (f"; general holdout {general['delta']:+.4f}"
                   + (f" (from the start {general['cumulative_delta']:+.4f})"
                      if general.get("cumulative_delta") is not None else "")
                   + (f", within the {general['allowed']:.4f} allowed" if general["policy"] != "report" else
                      ", reported only"))
    return {"promoted": promoted, "metric": label, "candidate": cand, "current": cur, "delta": delta,
            "interval": interval, "test": test, "general": general, "reason": reason}


def _forgetting(metric, candidate: dict, current: dict, start: dict | None, cand: float, cur: float, policy: str,
                max_drop: float, share: float) -> dict | None:
    """The general holdout's verdict (see promotion_decision), or None when it was not evaluated."""
    if not candidate.get("general") or not (current or {}).get("general"):
        return None
    g_cand, _ = metric_scores(candidate["general"], metric)
    g_cur, _ = metric_scores(current["general"], metric)
    if g_cand is None or g_cur is None:
        return None

    def allowance(gain: float) -> float:
        return max_drop if policy == "block" else max(max_drop, share * max(gain, 0.0))

    out = {"candidate": g_cand, "current": g_cur, "delta": g_cand - g_cur, "max_drop": max_drop, "policy": policy,
           "allowed": allowance(cand - cur), "start": None, "cumulative_delta": None, "allowed_cumulative": None}
    falls = []
    if out["delta"] < -out["allowed"]:
        falls.append(f"{g_cand:.4f} vs {g_cur:.4f} for the model in use ({out['delta']:+.4f}, more than the "
                     f"{out['allowed']:.4f} allowed)")
    g_start = metric_scores(start["general"], metric)[0] if (start or {}).get("general") else None
    s_score = metric_scores(start, metric)[0] if start else None
    if g_start is not None and s_score is not None:
        out.update(start=g_start, cumulative_delta=g_cand - g_start, allowed_cumulative=allowance(cand - s_score))
        if out["cumulative_delta"] < -out["allowed_cumulative"]:
            falls.append(f"{g_cand:.4f} vs {g_start:.4f} for the starting model ({out['cumulative_delta']:+.4f}, "
                         f"more than the {out['allowed_cumulative']:.4f} allowed)")
    out["ok"] = policy == "report" or not falls
    out["why"] = "; ".join(falls)
    return out


def trivial_baseline(coco_json: str | Path) -> float | None:
    """The holdout mIoU of a model that answers every click with the whole image: the mean over the holdout's
    masks of (mask area / image area). (An empty answer scores 0.) None without masks."""
    shares = [a["area"] / (im.height * im.width) for im in read_coco(coco_json) if im.height * im.width
              for a in im.annotations]
    return float(np.mean(shares)) if shares else None


def learned_nothing(evaluation: dict, baseline: float | None, margin: float = 0.02) -> str | None:
    """One line when the holdout's 1-click mIoU sits at a trivial answer's (whole-image masks: `baseline`;
    empty masks: 0), else None."""
    score = evaluation.get("miou@1")
    if score is None:
        return None
    if baseline is not None and abs(score - baseline) <= margin:
        return (f"holdout 1-click mIoU {score:.3f} is what whole-image masks score ({baseline:.3f}): the model "
                f"has learned nothing usable; likely causes: too few training steps (model.bootstrap_steps, "
                f"train.steps) or a start unsuited to these images")
    if score <= margin:
        return (f"holdout 1-click mIoU {score:.3f} is what empty masks score: the model has learned nothing "
                f"usable; likely causes: too few training steps (model.bootstrap_steps, train.steps) or a start "
                f"unsuited to these images")
    return None


def _promote(cfg: EngineConfig, candidate: str, candidate_eval: dict, current: str, current_eval: dict | None,
             start_eval: dict | None) -> dict:
    e = cfg.eval
    decision = promotion_decision(e.promote_metric, candidate_eval, current_eval, e.promote_min_delta,
                                  e.promote_confidence, e.general_max_drop, start_eval, e.forgetting,
                                  e.forgetting_share)
    return {**decision, "checkpoint": candidate if decision["promoted"] else current}


HEARTBEAT_S = 30.0  # a long step says it is still running at least this often


class _Heartbeat:
    """While a step runs, a line every `every` seconds: which step, how long so far (a user watching a
    two-minute retraining must not take silence for a hang)."""

    def __init__(self, step: str, progress: Callable[[str], None], every: float = HEARTBEAT_S):
        self.step, self.progress, self.every = step, progress, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{step}", daemon=True)
        self.t0 = time.monotonic()

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            self.progress(f"{self.step}: running, {time.monotonic() - self.t0:.0f} s so far")

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=1)


class _Runner:
    def __init__(self, ledger: Ledger, progress: Callable[[str], None]):
        self.ledger = ledger
        self.progress = progress

    def step(self, step: str, kind: str, round: int, inputs: dict, fn: Callable[[], dict]) -> dict:
        """Run `fn` as ledger step `step` unless the ledger already has it done (then its outputs)."""
        inputs = json.loads(json.dumps(_jsonable(inputs)))
        rec = self.ledger.get(step)
        if rec is not None and rec["status"] == DONE:
            if rec["inputs"] != inputs:
                diff = sorted(k for k in set(rec["inputs"]) | set(inputs)
                              if rec["inputs"].get(k) != inputs.get(k))
                raise LedgerError(f"{self.ledger.path}: step {step} was committed with other inputs "
                                  f"({', '.join(diff)}); use a new workdir to start over")
            self.progress(f"{step}: done earlier ({rec['seconds']:.1f} s), skipped")
            return rec["outputs"]
        if rec is not None:
            self.progress(f"{step}: resuming ({rec['status']} before)")
        else:
            self.progress(f"{step}: started")
        self.ledger.begin(step, kind, round, inputs)
        t0 = time.monotonic()
        try:
            with _Heartbeat(step, self.progress):
                out = fn()
        except KeyboardInterrupt:
            self.ledger.fail(step, "interrupted", time.monotonic() - t0, status=INTERRUPTED)
            raise
        except Exception as e:
            self.ledger.fail(step, _one_line(e), time.monotonic() - t0)
            raise StepFailed(f"{step}: {_one_line(e)}") from e
        if not isinstance(out, dict):
            self.ledger.fail(step, f"returned {type(out).__name__}, expected a dict", time.monotonic() - t0)
            raise StepFailed(f"{step}: returned {type(out).__name__}, expected a dict")
        seconds = time.monotonic() - t0
        stored = self.ledger.finish(step, out, seconds)
        self.progress(f"{step}: done in {seconds:.1f} s")
        return stored


def _raise_interrupt(signum, frame):  # SIGTERM (e.g. `ray job stop`) ends a run like Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def run_rounds(cfg: EngineConfig, steps: Steps | None = None,
               progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Run (or resume) the whole engine for `cfg`; returns a summary.

    Summary: {ledger, rounds: [{round, stage, images, decision, checkpoint}], final_checkpoint,
    auto: stage summary | None}. Raises StepFailed (one line naming the step) when a step fails;
    the ledger keeps everything committed before it, so a rerun continues from there.
    """
    steps = steps or Steps()
    workdir = Path(cfg.workdir).resolve()
    models = workdir / "models"
    with WorkdirLock(workdir):
        ledger = Ledger(workdir / LEDGER_FILE)
        run = _Runner(ledger, progress)
        old_term = None
        if threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return _run(cfg, steps, run, ledger, models)
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)


def _run(cfg: EngineConfig, steps: Steps, run: _Runner, ledger: Ledger, models: Path) -> dict:
    n_rounds = cfg.stages.manual.rounds + cfg.stages.semi.rounds
    metric, min_delta = cfg.eval.promote_metric, cfg.eval.promote_min_delta

    init = run.step("r0.init", "init", 0, {"checkpoint": cfg.model.checkpoint, "preset": cfg.model.preset},
                    lambda: steps.init_model(cfg, str(models / "r0-init")))
    current = init["checkpoint"]
    if cfg.model.bootstrap_steps > 0:
        boot = run.step("r0.bootstrap", "bootstrap", 0,
                        {"checkpoint": current, "steps": cfg.model.bootstrap_steps},
                        lambda: steps.bootstrap(cfg, current, str(models / "r0-bootstrap")))
        current = boot["checkpoint"]
        if boot.get("note"):
            run.progress(f"r0.bootstrap: {boot['note']}")
    runtime.record_current_model(cfg, current, 0)
    if n_rounds > 0 and not cfg.images.general_holdout_source:
        if cfg.model.bootstrap_steps > 0 and cfg.model.bootstrap_general_holdout > 0:
            # forgetting is always measured: the starting set gives a general holdout of its own
            gen = run.step("r0.general", "general", 0, {"images": cfg.model.bootstrap_general_holdout},
                           lambda: steps.general_holdout(cfg))
            cfg = cfg.model_copy(deep=True)
            cfg.images.general_holdout_source = gen["source"]
            cfg.images.general_holdout_ground_truth = gen["ground_truth"]
        else:
            run.progress("forgetting is not measured: no general holdout of the starting domain (a start without "
                         "its data); give one with images.general_holdout_source / general_holdout_ground_truth "
                         "(docs/people.md)")
    candidates: list[str] | None = None
    used: set[str] = set()
    if cfg.images.holdout_from_source > 0 and n_rounds > 0:
        # The holdout from the user's own images: chosen first, drawn by people, never selected or trained on
        candidates = steps.list_images(cfg)
        held = select_images(candidates, set(), cfg.images.holdout_from_source, cfg.seed, 0)
        cur = current
        hold = run.step("r0.holdout", "holdout", 0, {"checkpoint": cur, "image_ids": held},
                        lambda: steps.holdout(cfg, cur, held))
        run.progress(f"r0.holdout: {hold.get('images')} images, {hold.get('masks')} masks"
                     + (f" ({hold['truth_masks']} objects in the ground truth)"
                        if hold.get("truth_masks") is not None else ""))
        for line in hold.get("warnings") or []:
            run.progress(f"r0.holdout: warning: {line}")
        cfg = cfg.model_copy(deep=True)
        cfg.images.holdout_source, cfg.images.holdout_ground_truth = hold["source"], hold["ground_truth"]
        used.update(held)
    current_eval = start_eval = None
    baseline = None
    if n_rounds > 0:
        cur = current
        current_eval = run.step("r0.eval", "eval", 0, {"checkpoint": cur},
                                lambda: steps.evaluate(cfg, cur))
        start_eval = current_eval
        truth = cfg.path(cfg.images.holdout_ground_truth) if cfg.images.holdout_ground_truth else None
        baseline = trivial_baseline(truth) if truth and Path(truth).is_file() else None
        note = learned_nothing(current_eval, baseline)
        if note and (cfg.model.bootstrap_steps > 0 or cfg.model.checkpoint):  # (a fresh model is expected to)
            run.progress(f"r0.eval: warning: {note}")

    rounds: list[dict] = []
    for r in range(1, n_rounds + 1):
        stage = stage_of_round(cfg, r)
        per_round = getattr(cfg.stages, stage).images_per_round
        if candidates is None and not ledger.is_done(f"r{r}.select"):
            candidates = steps.list_images(cfg)
        cands, taken, cur = candidates, sorted(used), current
        inputs = {"stage": stage, "count": per_round, "excluded": len(taken)}
        if cfg.stages.select != "random":  # (random keeps the inputs earlier ledgers committed)
            inputs.update(how=cfg.stages.select, checkpoint=cur)
        sel = run.step(f"r{r}.select", "select", r, inputs,
                       lambda: steps.select(cfg, r, cur, cands, set(taken), per_round, run.progress))
        image_ids = sel["image_ids"]
        used.update(image_ids)
        if not image_ids:
            note = f"r{r}: no unannotated images left for the {stage} stage; round skipped"
            run.progress(note)
            rounds.append({"round": r, "stage": stage, "images": 0, "decision": None, "checkpoint": current,
                           "note": note})
            continue
        cur = current
        summary = run.step(f"r{r}.{stage}", stage, r, {"checkpoint": cur, "image_ids": image_ids},
                           lambda: getattr(steps, stage)(cfg, r, cur, image_ids))
        if stage == "semi" and cfg.stages.review.enabled:  # doubted masks back to people before training
            run.step(f"r{r}.review", "review", r, {"checkpoint": cur}, lambda: steps.review(cfg, r, cur))
        out_dir = str(models / f"r{r}")
        trained = run.step(f"r{r}.train", "train", r, {"init_checkpoint": cur, "out_dir": out_dir},
                           lambda: steps.train(cfg, cur, out_dir, r))
        cand = trained["checkpoint"]
        if trained.get("note"):
            run.progress(f"r{r}.train: {trained['note']}")
        cand_eval = run.step(f"r{r}.eval", "eval", r, {"checkpoint": cand}, lambda: steps.evaluate(cfg, cand))
        note = learned_nothing(cand_eval, baseline)
        if note:
            run.progress(f"r{r}.eval: warning: {note}")
        training = {"steps": trained.get("steps"), "planned_steps": trained.get("planned_steps"),
                    "comparable": not trained.get("short", False), "learned_nothing": note}
        decision = run.step(f"r{r}.promote", "promote", r,
                            {"candidate": cand, "current": cur, "metric": metric, "min_delta": min_delta},
                            lambda: {**_promote(cfg, cand, cand_eval, cur, current_eval, start_eval),
                                     "training": training})
        if decision["promoted"]:
            current, current_eval = cand, cand_eval
            runtime.record_current_model(cfg, current, r)  # the ML backend service switches to it
        rounds.append({"round": r, "stage": stage, "images": len(image_ids), "summary": summary,
                       "decision": decision, "checkpoint": current})

    auto_summary = None
    if cfg.stages.final_auto != "none":
        r = n_rounds + 1
        if candidates is None and not ledger.is_done(f"r{r}.select"):
            candidates = steps.list_images(cfg)
        cands, taken = candidates, sorted(used) if cfg.stages.final_auto == "remaining" else []
        sel = run.step(f"r{r}.select", "select", r, {"stage": "auto", "scope": cfg.stages.final_auto,
                                                     "excluded": len(taken)},
                       lambda: {"image_ids": select_images(cands, set(taken), None, cfg.seed, r),
                                "candidates": len(cands)})
        if sel["image_ids"]:
            cur, ids = current, sel["image_ids"]
            auto_summary = run.step(f"r{r}.auto", "auto", r, {"checkpoint": cur, "image_ids": ids},
                                    lambda: steps.auto(cfg, r, cur, ids))
        else:
            run.progress(f"r{r}: no images left for the automatic stage")
    return {"ledger": str(ledger.path), "rounds": rounds, "final_checkpoint": current, "auto": auto_summary}
