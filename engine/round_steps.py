"""The round loop's real step functions (the `Steps` defaults): initial model, bootstrap, general holdout, the
stages, the drawn holdout, retraining, evaluation and the choice of the next round's images."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def select_images(candidates: list[str], used: set[str], count: int | None, seed: int, round: int) -> list[str]:
    """Pick `count` (None: all) unused ids, deterministic: a seeded shuffle of the sorted candidates,
    so consecutive rounds don't take alphabetically adjacent (often similar) images. Sorted result."""
    pool = [i for i in sorted(set(candidates)) if i not in used]
    if count is None:
        return pool
    order = np.random.default_rng([seed, round]).permutation(len(pool))
    return sorted(pool[i] for i in order[:count])


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
