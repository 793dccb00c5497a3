"""Constants and errors every export module shares."""
from __future__ import annotations

import logging
from pathlib import Path

from storage.backend import sha256_file

log = logging.getLogger("storage.exports")

FORMATS = ("sa1b", "coco", "coco-polygons", "yolo-seg", "hf", "webdataset")
INDEX_NAME = "index.json"
MARKER_NAME = ".sa-engine-export"  # written first: marks a folder/prefix as ours, so --overwrite may replace it
LINEAGE_KEY = "sa_engine"
COCO_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
DEFAULT_SPLITS = {"all": 1.0}

# Columns each format reads from the store (the filters may use others; the store applies them).
_SA1B_COLUMNS = ["image_id", "mask_id", "height", "width", "rle", "area", "bbox", "predicted_iou",
                 "stability_score", "point_coords", "crop_box", "prompt_text", "stage", "origin", "round", "model_version",
                 "annotator", "verified", "source", "clicks", "lead_time_s", "prefill_iou", "history",
                 "created_at"]
_COCO_COLUMNS = ["image_id", "mask_id", "height", "width", "rle", "area", "bbox", "predicted_iou",
                 "stability_score", "point_coords", "crop_box", "prompt_text", "stage", "origin", "round", "model_version",
                 "verified"]


class ExportError(ValueError):
    """An export that cannot be made as asked; the message is one line naming the thing and the reason."""

class OutputExistsError(ExportError):
    """The output already exists and --overwrite was not given (or it is not an export of ours)."""

class EmptySelectionError(ExportError):
    """The filters select no masks: nothing is written."""

class CorruptExportError(ExportError):
    """A file of an export fails its checksum or is missing (raised by readers, naming the file)."""


def _sha256_file(path: Path) -> str:
    return sha256_file(path)
