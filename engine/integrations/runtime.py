"""The one place where the configuration becomes runtime objects.

Every stage, the retraining step, the CLI and the report ask this module for the mask store, the quarantine,
an image source, the segmenter, the automatic generator's parameters, the annotators' settings and the ML
backend's secret, so a storage, region, endpoint or image-size setting reaches every one of them (tested in
tests/test_runtime.py). The Label Studio connection is built in `engine/integrations/labelling.py` from the
server settings made here.

A stage reads the config once, at its start, into a plan made of the small picklable values built here
(`Resources`: stores, image sources, ground truth; `ModelSpec`: the segmenter; `PoolPlan`: the Ray pool); its
actors get the plan, not the config, and build what they need where they run.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.integrations.annotator import AnnotatorSettings
from storage.coco import GTObject, load_ground_truth
from engine.integrations.config import AutoStageConfig, EngineConfig
from engine.integrations.stage_kit import PoolPlan
from engine.integrations.labelstudio import LabelStudioError, ServerSettings, write_private_file
from model.amg_params import AmgParams
from model.calibration import CalibrationSettings
from model.concept import ConceptSegmenter
from model.segmenter import Segmenter
from storage.backend import Store, open_store
from storage.images import ImageSource
from storage.quarantine import Quarantine
from storage.shards import MaskStore

# --------------------------------------------------------------------------- what stages build from

@dataclass(frozen=True)
class Resources:
    """The storage and image settings of a run, read from the config once (paths resolved against the work dir):
    a stage's plan carries this, and the stage and its actors build their stores and image sources from it
    wherever they run. Picklable; knows no config."""

    workdir: str
    store_root: str
    shard_target_mb: float = 64.0
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    image_source_uri: str = ""
    max_side: int = 1500
    large_images: str = "downscale"
    max_pixels: int = 120_000_000
    high_bit_depth: str = "percentile"
    load_timeout_s: float = 120.0
    transient_retries: int = 3
    ground_truth_file: str | None = None  # images.ground_truth, resolved; None when unset

    def object_store(self, uri: str) -> Store:
        """A Store (local folder or s3://) for `uri` with the configured endpoint and region."""
        return open_store(uri, s3_endpoint_url=self.s3_endpoint_url, s3_region=self.s3_region)

    def mask_store(self, root: str | None = None) -> MaskStore:
        """The run's shard store, or another store root (resolved) with the same settings."""
        uri = root or self.store_root
        return MaskStore(uri, shard_target_mb=self.shard_target_mb, store=self.object_store(uri))

    def quarantine(self) -> Quarantine:
        """The run's quarantine (under the store root), retrying transient entries `transient_retries` times."""
        return Quarantine(self.store_root, store=self.object_store(self.store_root), retries=self.transient_retries)

    def image_source(self, uri: str | None = None) -> ImageSource:
        """The run's images, or another folder/prefix (resolved) read with the same rules."""
        uri = uri or self.image_source_uri
        return ImageSource(uri, max_side=self.max_side, large_images=self.large_images,
                           store=self.object_store(uri), max_pixels=self.max_pixels,
                           high_bit_depth=self.high_bit_depth, load_timeout_s=self.load_timeout_s)

    def ground_truth(self, what: str = "simulated annotators") -> dict[str, list[GTObject]]:
        """`images.ground_truth` per image id of the source; a clear error when `what` needs it and it is unset
        or matches no image."""
        if not self.ground_truth_file:
            raise LabelStudioError(f"{what} need images.ground_truth (COCO JSON)")
        ids = [r.image_id for r in self.image_source().list()]
        try:
            return load_ground_truth(self.ground_truth_file, image_ids=ids)
        except ValueError as e:  # matches no image: a run would make 0 masks and call it success
            raise LabelStudioError(f"images.ground_truth: {e} (images.source {self.image_source_uri})") from None


def resources(cfg: EngineConfig) -> Resources:
    """The config's storage and image settings, once."""
    return Resources(workdir=str(Path(cfg.workdir).resolve()), store_root=cfg.path(cfg.storage.root),
                     shard_target_mb=cfg.storage.shard_target_mb, s3_endpoint_url=cfg.storage.s3_endpoint_url,
                     s3_region=cfg.storage.s3_region, image_source_uri=cfg.path(cfg.images.source),
                     max_side=cfg.images.max_side, large_images=cfg.images.large_images,
                     max_pixels=cfg.images.max_pixels, high_bit_depth=cfg.images.high_bit_depth,
                     load_timeout_s=cfg.images.load_timeout_s, transient_retries=cfg.images.transient_retries,
                     ground_truth_file=cfg.path(cfg.images.ground_truth) if cfg.images.ground_truth else None)


@dataclass(frozen=True)
class ModelSpec:
    """Which segmenter to build and how: a checkpoint (resolved) or a fresh `preset` seeded with `seed`, on
    `device`, at `precision`, compiled when `compile`. Picklable: an actor builds its own copy."""

    checkpoint: str | None
    preset: str = "compact"
    device: str = "cpu"
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False

    def build(self, on_device: str | None = None) -> Segmenter:
        dev = on_device or self.device
        seg = (Segmenter.load(self.checkpoint, device=dev) if self.checkpoint
               else Segmenter.new(self.preset, device=dev, seed=self.seed))
        return seg.run_as(self.precision, self.compile)


def model_spec(cfg: EngineConfig, checkpoint: str | None) -> ModelSpec:
    """The segmenter for `checkpoint` (see checkpoint_path) as the config sets it up."""
    return ModelSpec(checkpoint=checkpoint_path(cfg, checkpoint), preset=cfg.model.preset, device=device(cfg),
                     seed=cfg.seed, precision=cfg.model.precision, compile=cfg.model.compile)


def pool_plan(cfg: EngineConfig, stage: str, round: int, index_key: str, num_actors: int, images_per_commit: int,
              images_per_batch: int = 1) -> PoolPlan:
    """A Ray stage's pool from the `ray` section and the stage's own sizes."""
    return PoolPlan(stage=stage, round=round, index_key=index_key, num_actors=num_actors,
                    cpus_per_actor=cfg.ray.cpus_per_actor, gpus_per_actor=cfg.ray.gpus_per_actor,
                    images_per_batch=images_per_batch, images_per_commit=images_per_commit,
                    ray_address=cfg.ray.address, ray_num_cpus=cfg.ray.num_cpus)


# --------------------------------------------------------------------------- storage

def object_store(cfg: EngineConfig, uri: str) -> Store:
    """A Store (local folder or s3://) for `uri` with the configured endpoint and region."""
    return resources(cfg).object_store(uri)


def mask_store(cfg: EngineConfig, root: str | None = None) -> MaskStore:
    """The run's shard store (`storage.root`), or another store root with the same settings."""
    return resources(cfg).mask_store(cfg.path(root) if root else None)


def export_options(cfg: EngineConfig) -> dict:
    """What an export needs to open its target (a folder or s3:// prefix) as the run's stores are opened: the
    S3 endpoint and region (storage/exports: every export and reader takes these keywords)."""
    return {"s3_endpoint_url": cfg.storage.s3_endpoint_url, "s3_region": cfg.storage.s3_region}


def quarantine(cfg: EngineConfig) -> Quarantine:
    """The run's quarantine (under `storage.root`), retrying transient entries `images.transient_retries` times."""
    return resources(cfg).quarantine()


def image_source(cfg: EngineConfig, uri: str | None = None) -> ImageSource:
    """The run's images (`images.source`), or another folder/prefix read with the same rules (the holdout,
    the bootstrap set): `images.max_side`, `images.large_images`, `images.max_pixels`, `images.high_bit_depth`,
    `images.load_timeout_s`, the S3 endpoint and region."""
    return resources(cfg).image_source(cfg.path(uri) if uri else None)


def ground_truth(cfg: EngineConfig, what: str = "simulated annotators") -> dict[str, list[GTObject]]:
    """`images.ground_truth` per image id; a clear error when `what` needs it and it is not set."""
    return resources(cfg).ground_truth(what)


# --------------------------------------------------------------------------- model

def device(cfg: EngineConfig) -> str:
    """`model.device`; "auto": cuda when the stages' actors are given GPUs (`ray.gpus_per_actor`) and torch
    sees one."""
    if cfg.model.device != "auto":
        return cfg.model.device
    if cfg.ray.gpus_per_actor > 0:

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def current_model_file(cfg: EngineConfig) -> Path:
    """`<workdir>/models/current.json`: the model in use (promoted), for the ML backend service to follow."""
    return Path(cfg.path("models")) / "current.json"


def record_current_model(cfg: EngineConfig, checkpoint: str | None, round: int) -> None:
    """Say which checkpoint is in use now (atomically); the ML backend service switches to it."""
    path = current_model_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"checkpoint": checkpoint, "round": int(round)}))
    os.replace(tmp, path)


def current_model(cfg: EngineConfig) -> str | None:
    """The checkpoint the round loop has in use (None: none recorded yet, or a fresh preset)."""
    try:
        return json.loads(current_model_file(cfg).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_path(cfg: EngineConfig, checkpoint: str | None) -> str | None:
    """The model to use: `checkpoint`, else `model.checkpoint`, else None (a fresh `model.preset`)."""
    path = checkpoint or cfg.model.checkpoint
    return cfg.path(path) if path else None


def concept_segmenter(cfg: EngineConfig, on_device: str | None = None) -> ConceptSegmenter:
    """SAM 3's concept segmenter from `stages.concept.checkpoint` (a transformers SAM 3 directory)."""
    path = cfg.stages.concept.checkpoint
    if not path:
        raise ValueError("stages.concept.checkpoint: not set (a transformers SAM 3 directory; docs/models.md)")
    return ConceptSegmenter.load(cfg.path(path), device=on_device or device(cfg))


def segmenter(cfg: EngineConfig, checkpoint: str | None, on_device: str | None = None) -> Segmenter:
    """The segmenter for `checkpoint` (see checkpoint_path); a fresh model is seeded with `seed`; it runs at
    `model.precision`, compiled when `model.compile`."""
    return model_spec(cfg, checkpoint).build(on_device)


def amg_params(section: AutoStageConfig, **overrides) -> AmgParams:
    """The automatic generator's parameters from `stages.auto`, field by field (the config's defaults are
    model/amg_params.py's); the generator's internals that are not configuration keep their defaults."""
    values = dict(
        points_per_side=section.points_per_side,
        points_per_batch=section.points_per_batch,
        pred_iou_thresh=section.pred_iou_thresh,
        stability_score_thresh=section.stability_score_thresh,
        stability_score_offset=section.stability_score_offset,
        box_nms_thresh=section.box_nms_thresh,
        crop_n_layers=section.crop_n_layers,
        crop_nms_thresh=section.crop_nms_thresh,
        crop_overlap_ratio=section.crop_overlap_ratio,
        crop_n_points_downscale_factor=section.crop_n_points_downscale_factor,
        min_mask_region_area=section.min_mask_region_area,
        max_mask_fraction=section.max_mask_fraction,
        multimask_output=section.multimask_output,
        use_m2m=section.use_m2m,
    )
    values.update(overrides)
    return AmgParams(**values)


def calibration_settings(cfg: EngineConfig, stage: str = "semi") -> CalibrationSettings:
    """What a stage's calibration aims for: its own `stages.<stage>.target_precision` / `precision_iou`, on the
    verified history the `calibration` section describes (shared by the semi-automatic and automatic stages)."""
    c, aim = cfg.calibration, cfg.stages.auto if stage == "auto" else cfg.stages.semi
    return CalibrationSettings(target_precision=aim.target_precision, precision_iou=aim.precision_iou,
                               default_pred_iou_thresh=c.default_pred_iou_thresh,
                               default_stability_score_thresh=c.default_stability_score_thresh,
                               history_images=c.history_images, min_coverage=c.min_coverage,
                               min_samples=c.min_samples, min_kept=c.min_kept, confidence=c.confidence)


def calibration_params(cfg: EngineConfig, **overrides) -> AmgParams:
    """The generator with the loose filters calibration re-runs history with (below any threshold chosen)."""
    c = cfg.calibration
    return amg_params(cfg.stages.auto, pred_iou_thresh=c.pred_iou_floor, stability_score_thresh=c.stability_floor,
                      **overrides)


# --------------------------------------------------------------------------- people and their tools

def annotator_settings(cfg: EngineConfig, every_object: bool = False) -> AnnotatorSettings:
    """The simulated annotators' settings. every_object: a holdout's annotators, who draw every object (parts
    too) with no per-image time limit, so that promotion is judged on all of them."""
    m = cfg.simulate
    return AnnotatorSettings(max_clicks=m.max_clicks, iou_target=m.iou_target,
                             seconds_per_click=m.seconds_per_click, seconds_per_mask=m.seconds_per_mask,
                             image_time_limit_s=m.image_time_limit_s, every_object=every_object)


def server_settings(cfg: EngineConfig) -> ServerSettings:
    """The managed Label Studio of this work dir: data under <workdir>/labelstudio, files served from <workdir>."""
    ls = cfg.labelstudio
    return ServerSettings(data_dir=Path(cfg.path("labelstudio")), port=ls.port, username=ls.username,
                          password=ls.password, token=ls.token, document_root=Path(cfg.workdir).resolve(),
                          database=ls.database, database_url=ls.database_url)


def labelstudio_url(cfg: EngineConfig) -> str | None:
    """The Label Studio the engine uses: the managed server on 127.0.0.1, or `labelstudio.url`."""
    return f"http://127.0.0.1:{cfg.labelstudio.port}" if cfg.labelstudio.managed else cfg.labelstudio.url


def ml_backend_token(cfg: EngineConfig) -> str:
    """The ML backend's secret: config, env SA_ENGINE_ML_BACKEND_TOKEN, or generated once per work dir."""
    token = os.environ.get("SA_ENGINE_ML_BACKEND_TOKEN") or cfg.labelstudio.ml_backend_token
    if token:
        return token
    path = Path(cfg.path("labelstudio")) / "ml_backend_token"
    if path.is_file():
        return path.read_text().strip()
    token = secrets.token_hex(20)
    write_private_file(path, token)
    return token
