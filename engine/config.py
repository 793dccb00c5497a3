"""The engine's one YAML configuration, validated with clear errors.

Every key has a default (documented in docs/config.md); unknown keys are refused so a typo
never silently falls back to a default. Paths that are relative are taken relative to `workdir`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImagesConfig(_Section):
    source: str = "synth/images"  # local folder or s3://bucket/prefix
    max_side: int = 1500  # larger images are handled per `large_images`
    large_images: Literal["downscale", "quarantine"] = "downscale"
    ground_truth: str | None = "synth/annotations.json"  # COCO JSON; drives simulated annotators
    holdout_source: str | None = "synth-holdout/images"  # frozen holdout, never annotated
    holdout_ground_truth: str | None = "synth-holdout/annotations.json"


class StorageConfig(_Section):
    root: str = "store"  # local folder or s3://bucket/prefix
    shard_target_mb: float = 64.0
    s3_endpoint_url: str | None = None  # e.g. a MinIO/moto server; None = AWS
    s3_region: str | None = None


class ModelConfig(_Section):
    preset: Literal["compact", "sam-vit-b", "sam-vit-l", "sam-vit-h"] = "compact"
    checkpoint: str | None = None  # a local directory (HF format) or a Meta .pth file
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ManualStageConfig(_Section):
    rounds: int = 2
    images_per_round: int = 8
    max_clicks: int = 10  # per object
    iou_target: float = 0.9  # the simulated annotator stops clicking at this IoU
    seconds_per_click: float = 1.5  # lead time charged per simulated click
    seconds_per_mask: float = 3.0  # fixed overhead per mask (choosing the object, submitting)
    image_time_limit_s: float = 120.0  # like SA-1B's annotators, leave an image after this long


class SemiStageConfig(_Section):
    rounds: int = 1
    images_per_round: int = 8
    target_precision: float = 0.9  # share of prefills with IoU >= precision_iou to a human mask
    precision_iou: float = 0.9
    default_pred_iou_thresh: float = 0.92  # used when there is no verified history to calibrate on
    default_stability_thresh: float = 0.95
    audit_fraction: float = 0.2
    max_prefill_per_task: int = 40  # Label Studio slows down with many brush regions


class AutoStageConfig(_Section):
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 100
    num_actors: int = 2
    images_per_commit: int = 16


class StagesConfig(_Section):
    manual: ManualStageConfig = Field(default_factory=ManualStageConfig)
    semi: SemiStageConfig = Field(default_factory=SemiStageConfig)
    auto: AutoStageConfig = Field(default_factory=AutoStageConfig)


class LabelStudioConfig(_Section):
    managed: bool = True  # start our own server; False = use `url` + `token`
    url: str | None = None
    token: str | None = None  # env SA_ENGINE_LS_TOKEN overrides
    port: int = 8089
    username: str = "admin@sa-engine.local"
    password: str | None = None  # env SA_ENGINE_LS_PASSWORD overrides; generated if unset
    ml_backend_port: int = 9099
    ml_backend_token: str | None = None  # generated if unset


class RayConfig(_Section):
    address: str = "local"  # "local", "auto", or ray://host:port
    num_cpus: int | None = None  # local cluster only
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0


class TrainConfig(_Section):
    minutes: float = 2.0  # wall-clock budget per retraining
    batch_size: int = 16
    lr: float = 3e-4
    manual_weight: float = 2.0  # manual masks count this much more than automatic ones
    num_workers: int = 1
    use_gpu: bool = False
    use_ray: bool = True


class EvalConfig(_Section):
    clicks: list[int] = Field(default_factory=lambda: [1, 3, 5])
    max_objects: int = 200


class EngineConfig(_Section):
    workdir: str = "runs/default"
    seed: int = 0
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    labelstudio: LabelStudioConfig = Field(default_factory=LabelStudioConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def path(self, p: str | None) -> str | None:
        """Resolve a configured path: URIs (s3://) as they are, relative paths under workdir."""
        if p is None or "://" in p or Path(p).is_absolute():
            return p
        return str(Path(self.workdir).resolve() / p)


class ConfigError(ValueError):
    """A configuration that can't be used; the message is one line naming the key and the reason."""


def load_config(path: str | Path | None, overrides: dict | None = None) -> EngineConfig:
    """Read and validate a YAML config (None: all defaults). Raises ConfigError with one line per problem."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{path or '<defaults>'}: {loc}: {msg}")
        raise ConfigError("\n".join(lines)) from None
