"""The project's own record types: one mask with its SA-1B fields and its lineage.

Every stage produces `MaskRecord`s; the shard store writes them one row each (see `MASK_SCHEMA`).
Coordinates are pixels of the stored image (the image the mask's `height`/`width` refer to).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from storage.rle import rle_area, rle_bbox

# Bump when a column is added or changes meaning; readers refuse shards from a newer version.
# 2: `prompt_text` (the concept stage's noun phrase); shards of version 1 read with it null.
# 3: `verifier_version`, `verifier_score` (the learned mask verifier's judgement); older shards read them null.
SCHEMA_VERSION = 3

STAGES = ("manual", "semi", "auto", "concept")
# How a mask came to be (finer than `stage`): semi-automatic rounds mix prefilled and manual masks.
ORIGINS = ("manual", "auto", "prefill_accepted", "prefill_edited", "manual_added", "concept",
           "verifier_accepted")  # a semi round's prefill on an image the verifier judged complete: no person saw it

MASK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("mask_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("rle", pa.binary()),  # COCO compressed RLE `counts` (bytes); size is (height, width)
        ("area", pa.int64()),  # pixels
        ("bbox", pa.list_(pa.float64(), 4)),  # XYWH pixels
        ("predicted_iou", pa.float32()),  # null for human masks
        ("stability_score", pa.float32()),  # null for human masks
        ("point_coords", pa.list_(pa.list_(pa.float64(), 2))),  # (K, 2) XY pixels of the prompt points
        ("crop_box", pa.list_(pa.float64(), 4)),  # XYWH pixels of the crop the mask came from
        ("prompt_text", pa.string()),  # the noun phrase that prompted it (concept stage; null otherwise)
        # lineage
        ("stage", pa.string()),  # one of STAGES
        ("origin", pa.string()),  # one of ORIGINS
        ("round", pa.int32()),
        ("model_version", pa.string()),
        ("annotator", pa.string()),  # null for automatic masks
        ("verified", pa.bool_()),  # a human accepted or drew it
        ("source", pa.string()),  # JSON: e.g. {"ls_project": 3, "ls_task": 17, "ls_annotation": 40}
        ("clicks", pa.int32()),  # clicks the annotator spent on this mask (null if none)
        ("lead_time_s", pa.float32()),  # annotator seconds spent on this mask (null if none)
        ("prefill_iou", pa.float32()),  # IoU between prefill and final mask (prefill_edited only)
        ("verifier_version", pa.string()),  # the mask verifier that judged it (model/verifier.py; null if none)
        ("verifier_score", pa.float32()),  # its P(accepted as it is)
        ("history", pa.string()),  # JSON list of superseded versions (latest-wins updates)
        ("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={b"sa_engine_schema_version": str(SCHEMA_VERSION).encode()},
)


def make_mask_id(image_id: str, *parts: Any) -> str:
    """Deterministic mask id: the same image and the same provenance give the same id.

    parts: whatever identifies the mask within its image and stage (e.g. stage, round, model
    version and mask index; or a Label Studio task and region id). Returns 16 hex chars.
    """
    key = json.dumps([image_id, *parts], sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


@dataclass
class MaskRecord:
    """One mask. `rle` is COCO compressed RLE: {"size": [h, w], "counts": bytes}."""

    image_id: str
    mask_id: str
    height: int
    width: int
    rle: dict
    area: int
    bbox: list[float]  # XYWH pixels
    stage: str
    round: int
    model_version: str | None = None
    predicted_iou: float | None = None
    stability_score: float | None = None
    point_coords: list[list[float]] = field(default_factory=list)
    crop_box: list[float] | None = None  # XYWH pixels; None means the whole image
    prompt_text: str | None = None  # the concept stage's noun phrase
    origin: str | None = None  # defaults to `stage` ("manual"/"auto") when None
    annotator: str | None = None
    verified: bool = False
    source: dict | None = None
    clicks: int | None = None
    lead_time_s: float | None = None
    prefill_iou: float | None = None
    verifier_version: str | None = None
    verifier_score: float | None = None
    history: list | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @classmethod
    def from_rle(cls, image_id: str, mask_id: str, rle: dict, stage: str, round: int, **fields) -> "MaskRecord":
        """The one way from a mask to a record: size, area and bbox (XYWH pixels) read from its compressed RLE
        ({"size": [h, w], "counts": bytes}); every other field as given."""
        h, w = rle["size"]
        return cls(image_id=image_id, mask_id=mask_id, height=int(h), width=int(w), rle=rle,
                   area=int(rle_area([rle])[0]), bbox=[float(v) for v in rle_bbox([rle])[0]], stage=stage,
                   round=round, **fields)

    def to_row(self) -> dict:
        """The Parquet row (column name -> value) for `MASK_SCHEMA`."""
        counts = self.rle["counts"]
        return {
            "image_id": self.image_id,
            "mask_id": self.mask_id,
            "height": int(self.height),
            "width": int(self.width),
            "rle": counts.encode() if isinstance(counts, str) else bytes(counts),
            "area": int(self.area),
            "bbox": [float(v) for v in self.bbox],
            "predicted_iou": None if self.predicted_iou is None else float(self.predicted_iou),
            "stability_score": None if self.stability_score is None else float(self.stability_score),
            "point_coords": [[float(x), float(y)] for x, y in self.point_coords],
            "crop_box": [0.0, 0.0, float(self.width), float(self.height)]
            if self.crop_box is None
            else [float(v) for v in self.crop_box],
            "prompt_text": self.prompt_text,
            "stage": self.stage,
            "origin": self.origin or (self.stage if self.stage in ("auto", "concept") else "manual"),
            "round": int(self.round),
            "model_version": self.model_version,
            "annotator": self.annotator,
            "verified": bool(self.verified),
            "source": None if self.source is None else json.dumps(self.source, sort_keys=True),
            "clicks": None if self.clicks is None else int(self.clicks),
            "lead_time_s": None if self.lead_time_s is None else float(self.lead_time_s),
            "prefill_iou": None if self.prefill_iou is None else float(self.prefill_iou),
            "verifier_version": self.verifier_version,
            "verifier_score": None if self.verifier_score is None else float(self.verifier_score),
            "history": None if self.history is None else json.dumps(self.history),
            "created_at": self.created_at,
        }

    @classmethod
    def from_row(cls, row: dict) -> "MaskRecord":
        """Inverse of `to_row` (row as given by pyarrow's `to_pylist`)."""
        return cls(
            image_id=row["image_id"],
            mask_id=row["mask_id"],
            height=row["height"],
            width=row["width"],
            rle={"size": [row["height"], row["width"]], "counts": row["rle"]},
            area=row["area"],
            bbox=list(row["bbox"]),
            stage=row["stage"],
            round=row["round"],
            model_version=row.get("model_version"),
            predicted_iou=row.get("predicted_iou"),
            stability_score=row.get("stability_score"),
            point_coords=[list(p) for p in (row.get("point_coords") or [])],
            crop_box=list(row["crop_box"]) if row.get("crop_box") is not None else None,
            prompt_text=row.get("prompt_text"),
            origin=row.get("origin"),
            annotator=row.get("annotator"),
            verified=bool(row.get("verified")),
            source=json.loads(row["source"]) if row.get("source") else None,
            clicks=row.get("clicks"),
            lead_time_s=row.get("lead_time_s"),
            prefill_iou=row.get("prefill_iou"),
            verifier_version=row.get("verifier_version"),
            verifier_score=row.get("verifier_score"),
            history=json.loads(row["history"]) if row.get("history") else None,
            created_at=row["created_at"],
        )


def records_to_table(records: list[MaskRecord]) -> pa.Table:
    """Records -> an Arrow table with exactly `MASK_SCHEMA`."""
    return pa.Table.from_pylist([r.to_row() for r in records], schema=MASK_SCHEMA)
