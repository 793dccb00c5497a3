"""The engine's one YAML configuration, validated with clear errors.

Every key has a default (documented in docs/config.md); unknown keys are refused so a typo
never silently falls back to a default. Paths that are relative are taken relative to `workdir`.
"""
from __future__ import annotations

import ast
import difflib
import io
import json
import tokenize
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.amg_params import AmgParams
from model.checkpoints import PRESETS

_AMG = AmgParams()


PER_MASK_METRICS = ("oracle@1", "box_miou")  # besides miou@k: the holdout metrics scored per mask
SET_METRICS = ("AP", "AP50", "AP75", "AR@1", "AR@10", "AR@100")  # the automatic masks' COCOeval figures
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")  # never a place for a run's data
# Keys that were renamed or moved: a config still using the old name is told the new one. Budgets are optimiser steps
# now; the minutes keys remain as optional wall-clock guards.
RENAMED = {"train.max_steps": "train.steps (the budget, optimiser steps; train.minutes is now only a guard)",
           "model.bootstrap_max_steps": "model.bootstrap_steps (the budget, optimiser steps; "
                                        "model.bootstrap_minutes is now only a guard)",
           "stages.semi.calibration_images": "calibration.history_images",
           "stages.semi.calibration_pred_iou_floor": "calibration.pred_iou_floor",
           "stages.semi.calibration_stability_floor": "calibration.stability_floor",
           "stages.semi.calibration_min_coverage": "calibration.min_coverage",
           "stages.semi.calibration_min_samples": "calibration.min_samples",
           "stages.semi.calibration_min_kept": "calibration.min_kept",
           "stages.semi.calibration_confidence": "calibration.confidence",
           "stages.semi.default_pred_iou_thresh": "calibration.default_pred_iou_thresh",
           "stages.semi.default_stability_score_thresh": "calibration.default_stability_score_thresh",
           "stages.manual.max_clicks": "simulate.max_clicks",
           "stages.manual.iou_target": "simulate.iou_target",
           "stages.manual.seconds_per_click": "simulate.seconds_per_click",
           "stages.manual.seconds_per_mask": "simulate.seconds_per_mask",
           "stages.manual.image_time_limit_s": "simulate.image_time_limit_s",
           "stages.semi.triage_review_share": "simulate.triage_review_share",
           "stages.semi.review_accept_iou": "simulate.review_accept_iou",
           "stages.semi.review_edit_iou": "simulate.review_edit_iou",
           "stages.semi.cover_iou": "simulate.cover_iou",
           "stages.semi.seconds_per_review": "simulate.seconds_per_review"}


class _Section(BaseModel):
    # strict: a string or a bool where a number is wanted ('8', true) is a mistake, not something to coerce;
    # no inf or NaN in any number
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImagesConfig(_Section):
    source: str = "synth/images"  # local folder or s3://bucket/prefix
    max_side: int = Field(1500, ge=32)  # larger images are handled per `large_images`
    large_images: Literal["downscale", "quarantine"] = "downscale"  # model sees max_side, masks keep full size
    max_pixels: int = Field(120_000_000, ge=1)  # more pixels than this is refused as a decompression bomb (PIL's own 89.5 Mpx guard is off)
    high_bit_depth: Literal["percentile", "range"] = "percentile"  # 16-bit/float grey to 8 bits: stretch the image's 0.5..99.5th percentile, or divide by the container's range
    load_timeout_s: float = Field(120.0, gt=0)  # an image not read within this (a FIFO, a hung mount) is set aside as transient
    transient_retries: int = Field(3, ge=0)  # reruns that try again an image set aside as transient (missing, half-written) before it is held until released
    ground_truth: str | None = "synth/annotations.json"  # COCO JSON; drives simulated annotators
    holdout_from_source: int = Field(0, ge=0)  # > 0: carve this many images out of `source` as the frozen holdout, annotated by people (or the simulated annotators) in their own Label Studio project before round 1 and never trained on; 0: use holdout_source / holdout_ground_truth
    holdout_source: str | None = "synth-holdout/images"  # frozen holdout, never annotated
    holdout_ground_truth: str | None = "synth-holdout/annotations.json"  # COCO JSON; gates promotion
    general_holdout_source: str | None = None  # a second holdout from the starting domain; guards against forgetting
    general_holdout_ground_truth: str | None = None  # its COCO JSON (beside its images/ folder)


class StorageConfig(_Section):
    root: str = "store"  # local folder or s3://bucket/prefix
    shard_target_mb: float = Field(64.0, gt=0)  # Parquet shard size to aim for
    s3_endpoint_url: str | None = None  # e.g. a MinIO/moto server; None = AWS
    s3_region: str | None = None  # None = the standard AWS chain


class ModelConfig(_Section):
    preset: Literal[PRESETS] = "compact"  # a fresh model when no checkpoint (families: docs/models.md)
    checkpoint: str | None = None  # a local directory (HF format) or a Meta .pth file
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto": cuda when available
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # network arithmetic: fp32, or autocast to bf16/fp16 (embedding, decoding; training: fp32/bf16)
    compile: bool = False  # torch.compile the encoder and decoder (inference; pays off on GPUs, first call compiles)
    bootstrap_steps: int = Field(0, ge=0)  # round 0: train this many optimiser steps on a separate labelled synthetic set first (the budget: the same model on any machine); 0 = off
    bootstrap_minutes: float | None = Field(None, gt=0)  # optional wall-clock guard on the bootstrap: training stopped by it is reported as short ("trained N of M steps") and not comparable; None = no guard
    bootstrap_images: int = Field(64, ge=1)  # size of that synthetic set
    bootstrap_seed: int = 1000  # its seed (a split of its own, disjoint from the run's images and holdout)
    bootstrap_image_size: int = Field(256, ge=32)  # its image side in pixels
    bootstrap_family: Literal["shapes", "pebbles"] = "shapes"  # its synthetic scene family (engine/integrations/synth.py)
    bootstrap_general_holdout: int = Field(16, ge=0)  # with a bootstrap and no images.general_holdout_*: a general holdout of this many images of the starting set's family (a seed of its own) measures forgetting; 0 = none


class ManualStageConfig(_Section):
    rounds: int = Field(2, ge=0)  # N1: assisted-manual rounds
    images_per_round: int = Field(8, ge=1)  # images annotated per manual round
    double_share: float = Field(0.0, ge=0, le=1)  # this share of a round's tasks is drawn by two annotators (Label Studio picks which); only the first annotation of a task is stored, the second measures agreement per annotator (the report's Annotators section; the review queue takes the masks of annotators below stages.review.min_agreement first)
    gold_share: float = Field(0.0, ge=0, le=1)  # gold tasks: this share of a round's images (rounded up) is added from the holdout, mixed in among the others; what annotators draw on them is scored against the holdout's masks per annotator (the report's Annotators section) and never stored


class SemiStageConfig(_Section):
    rounds: int = Field(1, ge=0)  # N2: semi-automatic rounds (after the manual ones)
    images_per_round: int = Field(8, ge=1)  # images annotated per semi-automatic round
    target_precision: float = Field(0.9, gt=0, le=1)  # share of prefills with IoU >= precision_iou to a human mask
    precision_iou: float = Field(0.9, gt=0, le=1)  # IoU to a human mask at which a prefill counts as correct
    triage: Literal["thresholds", "verifier", "both"] = "verifier"  # what chooses the prefills: the calibrated (predicted IoU, stability) thresholds; the learned mask verifier (model/verifier.py) fitted on the same history, at the same target, used only when it ranks a held-out share of the history's decisions better than the predicted IoU (else the thresholds); or both must accept
    complete_below: float | None = Field(None, ge=0, le=1)  # with triage verifier | both: an image whose accepted prefills leave at most this share of its object-like area uncovered (model/verifier.py uncovered_objectness) is complete: its prefills are written as verifier_accepted without a person (unverified until audited or reviewed) and only the other images go to people; None: every image goes to people
    audit_fraction: float = Field(0.2, ge=0, le=1)  # share of accepted prefills checked against the truth (simulation) or queued for a reviewer (people)
    max_prefill_per_task: int = Field(40, ge=1)  # Label Studio slows down with many brush regions
    max_pages_per_image: int = Field(3, ge=1)  # more confident masks than cap x pages: the lowest-ranked are dropped
    points_per_side: int | None = Field(None, ge=1, le=256)  # generator grid; None = stages.auto.points_per_side


class AutoStageConfig(_Section):
    # The generator's keys default to model/amg_params.py's AmgParams (SAM's values): one source of defaults.
    points_per_side: int = Field(_AMG.points_per_side, ge=1, le=256)  # point grid of the full image (SAM: 32)
    points_per_batch: int = Field(_AMG.points_per_batch, ge=1)  # prompts decoded at once
    pred_iou_thresh: float = Field(_AMG.pred_iou_thresh, ge=0, le=1)  # keep masks whose predicted IoU is at least this
    stability_score_thresh: float = Field(_AMG.stability_score_thresh, ge=0, le=1)  # keep masks whose stability score is at least this
    stability_score_offset: float = Field(_AMG.stability_score_offset, ge=0)  # logit offset of the stability score
    box_nms_thresh: float = Field(_AMG.box_nms_thresh, gt=0, le=1)  # box IoU for non-maximum suppression within a crop
    crop_n_layers: int = Field(_AMG.crop_n_layers, ge=0, le=4)  # crop layers: layer i has (2^i)^2 crops (SA-1B: 2)
    crop_nms_thresh: float = Field(_AMG.crop_nms_thresh, gt=0, le=1)  # box IoU for suppression across crops
    crop_overlap_ratio: float = Field(_AMG.crop_overlap_ratio, ge=0, lt=1)  # overlap of neighbouring crops, as a share of the crop side
    crop_n_points_downscale_factor: int = Field(_AMG.crop_n_points_downscale_factor, ge=1)  # points per side shrink by this per crop layer
    max_mask_fraction: float = Field(_AMG.max_mask_fraction, gt=0, le=1)  # drop masks covering at least this share of the image (SA-1B)
    min_mask_region_area: int = Field(_AMG.min_mask_region_area, ge=0)  # remove islands and fill holes smaller than this (pixels)
    multimask_output: bool = _AMG.multimask_output  # 3 masks per grid point (False: 1, as SAM 2's generator allows)
    use_m2m: bool = _AMG.use_m2m  # SAM 2's mask-to-mask refinement: each candidate decoded again with its own logits as the mask prompt
    calibrate: bool = False  # choose pred_iou_thresh / stability_score_thresh from verified history, as stages.semi does
    target_precision: float = Field(0.9, gt=0, le=1)  # with calibrate: share of kept masks with IoU >= precision_iou to a verified mask
    precision_iou: float = Field(0.9, gt=0, le=1)  # with calibrate: IoU at which a kept mask counts as correct
    verifier: str | None = None  # a mask verifier (model/verifier.py JSON, e.g. <workdir>/semi/round-N/verifier.json): every mask gets its score; below verifier_drop it is dropped, below verifier_keep it is kept and marked for the review queue
    verifier_keep: float = Field(0.5, ge=0, le=1)  # verifier score from which a mask is kept without review
    verifier_drop: float = Field(0.1, ge=0, le=1)  # verifier score below which a mask is dropped
    num_actors: int = Field(2, ge=1)  # Ray Data actors (model copies) generating masks
    images_per_commit: int = Field(16, ge=1)  # images per shard commit (the unit of resume)
    images_per_batch: int = Field(1, ge=1)  # images an actor takes at once: decoded in threads, embedded in one encoder call (GPU: 4-8)


class ReviewStageConfig(_Section):
    enabled: bool = False  # after each semi round, send the masks the engine doubts back to people (stages/review.py)
    max_predicted_iou: float = Field(0.8, ge=0, le=1)  # an accepted prefill under this predicted IoU is doubted
    max_masks: int = Field(200, ge=1)  # at most this many masks per review, least trusted first
    min_agreement: float = Field(0.7, ge=0, le=1)  # masks of annotators whose agreement on double tasks (stages.manual.double_share) is below this are reviewed first


class ConceptStageConfig(_Section):
    checkpoint: str | None = None  # a transformers SAM 3 directory (model_type sam3, with its tokenizer files): docs/models.md
    score_thresh: float = Field(0.5, ge=0, le=1)  # keep instances whose score (query x presence) is above this
    mask_thresh: float = Field(0.5, ge=0, le=1)  # a pixel belongs to the instance above this probability
    max_instances: int = Field(100, ge=1)  # per image and phrase, best first
    num_actors: int = Field(1, ge=1)  # Ray Data actors (model copies)
    images_per_commit: int = Field(16, ge=1)  # images per shard commit (the unit of resume)


class CalibrationConfig(_Section):
    # The verified history of earlier rounds (model/calibration.py), newest first, from which the semi-automatic
    # prefill and a calibrating automatic stage (stages.auto.calibrate) choose their thresholds, each at its own
    # stages.<stage>.target_precision / precision_iou.
    history_images: int = Field(16, ge=1)  # at most this many history images are re-run through the generator
    pred_iou_floor: float = Field(0.5, ge=0, le=1)  # loose generator filters for history, below any threshold chosen
    stability_floor: float = Field(0.5, ge=0, le=1)  # the same for the stability score
    min_coverage: float = Field(0.5, ge=0.0, le=1.0)  # a generated history mask with less of its area on verified masks is not judged (nobody drew that object); 0 = judge all
    min_samples: int = Field(50, ge=1)  # fewer history masks: the defaults above
    min_kept: int = Field(20, ge=1)  # thresholds must keep at least this many history masks
    confidence: float = Field(0.9, gt=0, lt=1)  # one-sided confidence of the precision lower bound
    default_pred_iou_thresh: float = Field(0.92, ge=0, le=1)  # used when there is no verified history to calibrate on
    default_stability_score_thresh: float = Field(0.95, ge=0, le=1)  # used when there is no verified history to calibrate on


class SimulateConfig(_Section):
    # What only the simulated annotators (stages.simulate: true) read; people in Label Studio are not told any of it.
    max_clicks: int = Field(10, ge=1)  # per object
    iou_target: float = Field(0.9, gt=0, le=1)  # the simulated annotator stops clicking at this IoU
    seconds_per_click: float = Field(1.5, ge=0)  # lead time charged per simulated click
    seconds_per_mask: float = Field(3.0, ge=0)  # fixed overhead per mask (choosing the object, submitting)
    image_time_limit_s: float = Field(120.0, gt=0)  # like SA-1B's annotators, leave an image after this long
    triage_review_share: float = Field(0.1, ge=0, le=1)  # the per-round triage comparison (thresholds / verifier / both) lets people review this share of the candidates beyond what each accepts
    review_accept_iou: float = Field(0.85, ge=0, le=1)  # coarser than precision_iou on purpose: the audit measures the difference
    review_edit_iou: float = Field(0.5, ge=0, le=1)  # below: the prefill is deleted, not fixed
    cover_iou: float = Field(0.5, ge=0, le=1)  # a truth object matched by a kept mask at this IoU is not clicked again
    seconds_per_review: float = Field(1.0, ge=0)  # lead time charged per prefill looked at (accept or delete)


class StagesConfig(_Section):
    simulate: bool = True  # simulated annotators (need images.ground_truth); False = people in Label Studio
    final_auto: Literal["remaining", "all", "none"] = "remaining"  # images for the last, automatic stage
    select: Literal["random", "uncertain"] = "random"  # next round's images: seeded random, or the current model's least sure (model/uncertainty.py)
    select_pool: int = Field(64, ge=1)  # "uncertain": score at most this many unannotated images (a seeded random sample) per round
    manual: ManualStageConfig = Field(default_factory=ManualStageConfig)
    semi: SemiStageConfig = Field(default_factory=SemiStageConfig)
    auto: AutoStageConfig = Field(default_factory=AutoStageConfig)
    review: ReviewStageConfig = Field(default_factory=ReviewStageConfig)
    concept: ConceptStageConfig = Field(default_factory=ConceptStageConfig)


class LabelStudioConfig(_Section):
    managed: bool = True  # start our own server; False = use `url` + `token`
    url: str | None = None  # an existing server when managed is false
    token: str | None = None  # env SA_ENGINE_LS_TOKEN overrides
    port: int = Field(8089, ge=1, le=65535)  # port of the managed server (127.0.0.1)
    username: str = "admin@sa-engine.local"  # admin user of the managed server
    password: str | None = None  # env SA_ENGINE_LS_PASSWORD overrides; generated if unset
    ml_backend_port: int = Field(9099, ge=1, le=65535)  # port of our ML backend
    ml_backend_url: str | None = None  # the ML backend service where it runs elsewhere (docker-compose: http://ml-backend:9099): stages use it and register it with Label Studio; None: 127.0.0.1:ml_backend_port
    ml_backend_token: str | None = None  # generated if unset
    database: Literal["sqlite", "postgresql"] = "sqlite"  # the managed server's database: sqlite (one person; in its data dir) or postgresql (a team annotating at once: a local cluster the engine starts, or database_url)
    database_url: str | None = None  # with database postgresql: an existing database, postgresql://user:password@host:port/name (the password may come from SA_ENGINE_LS_DB_PASSWORD); None: a local cluster of Debian's PostgreSQL under the data dir


    @model_validator(mode="after")
    def _ports_differ(self) -> "LabelStudioConfig":
        if self.managed and self.port == self.ml_backend_port:
            raise ValueError(f"port and ml_backend_port are both {self.port}: the managed Label Studio and the "
                             f"ML backend each need a port of their own")
        if self.database_url and self.database != "postgresql":
            raise ValueError("database_url is set but database is sqlite: set database: postgresql to use it")
        return self


class RayConfig(_Section):
    address: str = "local"  # "local", "auto", or ray://host:port
    num_cpus: int | None = Field(None, ge=1)  # local cluster only
    cpus_per_actor: float = Field(0.5, gt=0)  # CPUs per stage actor (<= 0.5 on small machines)
    gpus_per_actor: float = Field(0.0, ge=0)  # GPUs per stage actor (fractions share a GPU)


class TrainConfig(_Section):
    steps: int = Field(400, ge=1)  # optimiser steps per retraining: the budget (the same config and seed give the same model on an idle laptop, a busy CI machine and a GPU)
    minutes: float | None = Field(None, gt=0)  # optional wall-clock guard per retraining: a retraining stopped by it is reported as short ("trained N of M steps") and its round as not comparable; None = no guard
    batch_images: int | None = Field(None, ge=1)  # images per step per worker (None: the recipe's default in model/train.py)
    lr: float | None = Field(None, gt=0)  # peak learning rate (None: model/train.py's 8e-3 from scratch, engine/retrain.py's FINE_TUNE_LR 2e-3 for a trained model; a real SAM wants ~1e-5)
    optimizer: Literal["muon", "adamw"] | None = None  # muon: Muon for weight matrices, AdamW for the rest (None: the recipe's default)
    crop_share: float | None = Field(None, ge=0, le=1)  # share of the budget on windows of half the input side (None: the recipe's 0.75; 0: whole images only; conv encoders)
    parts: Literal["auto", "all", "prompt_decoder", "decoder"] = "auto"  # what learns: auto = all for the compact model and SAM 1, the mask decoder alone for SAM 2 / SAM-HQ / SAM 3 tracker (docs/models.md)
    buffer_images: int = Field(512, ge=1)  # scenes (an image and its masks) each training worker holds in memory; the rest streams from the store (a data set that fits is held whole)
    prompts_per_mask: int | None = Field(None, ge=1, le=16)  # the first prompt + corrective clicks each training mask gets, fed its previous mask (None: the recipe's 2; the simulated annotators use up to simulate.max_clicks)
    manual_weight: float = Field(2.0, ge=0)  # manual masks count this much more than automatic ones
    include_bootstrap: bool = True  # also retrain on the bootstrap set (weight 1), as SAM retrained on all data so far
    num_workers: int = Field(1, ge=1)  # Ray Train workers
    use_gpu: bool = False  # one GPU per Ray Train worker
    use_ray: bool = True  # False: train in-process (no Ray Train)


class EvalConfig(_Section):
    clicks: list[int] = Field(default_factory=lambda: [1, 3, 5])  # holdout mIoU after these many clicks
    max_objects: int = Field(200, ge=1)  # at most this many holdout objects are evaluated
    promote_metric: str | dict[str, float] = "miou@1"  # holdout metric a retrained model must beat, or {metric: weight} for a weighted mix of per-mask metrics (miou@k, oracle@1, box_miou)
    promote_min_delta: float = Field(0.0, ge=0)  # by more than this
    promote_confidence: float = Field(0.95, ge=0.0, lt=1.0)  # paired bootstrap over holdout masks: the interval's low end must pass the delta (0: compare means)
    general_max_drop: float = Field(0.02, ge=0.0)  # a fall on the general holdout (the starting domain) always allowed; see forgetting
    forgetting: Literal["weigh", "block", "report"] = "weigh"  # what a fall on the general holdout does, judged against the model in use and (cumulatively) the starting model: weigh: refuse a fall larger than max(general_max_drop, forgetting_share x the candidate's gain on the holdout); block: refuse any fall beyond general_max_drop; report: measure and report only
    forgetting_share: float = Field(0.25, ge=0.0)  # with forgetting weigh: the share of the holdout gain a fall on the general holdout may take


class EngineConfig(_Section):
    workdir: str = Field("runs/default", min_length=1)  # all a run writes (ledger, models, LS data); other relative paths are under it
    seed: int = 0  # seeds image selection and the fresh model
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)
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

class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def set_dotted(data: dict, key: str, value) -> None:
    """data["a"]["b"] = value for key "a.b" (sections made as needed): config overrides."""
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def load_config(path: str | Path | None, overrides: dict | None = None) -> EngineConfig:
    """Read and validate a YAML config (None: all defaults). Raises ConfigError with one line per problem."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.load(p.read_text(), Loader=_StrictLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{path or '<defaults>'}: {_describe_error(err)}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def _section_fields(loc: tuple) -> list[str]:
    """The field names of the section that `loc` (a pydantic error location) points into."""
    model: type[BaseModel] = EngineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe_error(err: dict) -> str:
    """One pydantic error as `key: reason`, with a close spelling for unknown keys and the bad value."""
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden" and loc in RENAMED:
        return f"{loc}: renamed: use {RENAMED[loc]}"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), _section_fields(err["loc"]), n=1)
        return f"{loc}: unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    if err["type"] == "missing":
        return f"{loc}: required"
    value = err.get("input")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"{loc}: {err['msg']} (got {shown})"


# --- the reference: every key, its type, default and meaning, generated from the classes above ---

def _field_comments() -> dict[tuple[str, str], str]:
    """{(class name, field name): trailing comment} read from this file's source."""
    source = Path(__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if item.end_lineno in comments:
                        found[(node.name, item.target.id)] = comments[item.end_lineno]
    return found


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = text.replace("typing.", "").replace("NoneType", "None")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1] + " | None"
    return text


def config_reference() -> list[dict]:
    """One row per leaf key: {key, type, default, doc}, in the order of the classes."""
    comments = _field_comments()
    rows: list[dict] = []

    def walk(model: type[BaseModel], prefix: str, instance: BaseModel) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            value = getattr(instance, name)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.", value)
                continue
            rows.append({"key": f"{prefix}{name}", "type": _type_name(ann), "default": value,
                         "doc": comments.get((model.__name__, name), "")})

    walk(EngineConfig, "", EngineConfig())
    return rows


def config_reference_markdown() -> str:
    """The key table of docs/config.md (tests check the doc holds exactly this)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for row in config_reference():
        default = json.dumps(row["default"])
        typ = row["type"].replace("|", "\\|")
        lines.append(f"| `{row['key']}` | `{typ}` | `{default}` | {row['doc'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def defaults_yaml() -> str:
    """All defaults as a YAML config file, each key with its meaning as a comment."""
    comments = {r["key"]: r["doc"] for r in config_reference()}
    out: list[str] = ["# sa-engine configuration: every key with its default (docs/config.md)."]

    def emit(data: dict, prefix: str, indent: int) -> None:
        for key, value in data.items():
            full = f"{prefix}{key}"
            pad = "  " * indent
            if isinstance(value, dict):
                out.append(f"{pad}{key}:")
                emit(value, f"{full}.", indent + 1)
            else:
                line = f"{pad}{key}: {json.dumps(value)}"
                note = comments.get(full)
                out.append(f"{line}  # {note}" if note else line)

    emit(EngineConfig().model_dump(), "", 0)
    return "\n".join(out) + "\n"


# The checks live beside the config (engine/integrations/config_check.py); callers import them from here.
from engine.integrations.config_check import check_config, ray_address_problem, validate_for_run  # noqa: E402,F401
