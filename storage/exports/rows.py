"""Store rows -> SA-1B / COCO JSON (and SA-1B JSON back to records)."""
from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.exports.common import (
    COCO_CATEGORY,
    LINEAGE_KEY,
    CorruptExportError,
)
from storage.exports.plan import (
    _Plan,
)
from storage.records import MaskRecord

log = logging.getLogger("storage.exports")

# ----------------------------------------------------------------------------------------------------------
# Row -> JSON


def _counts_str(counts: bytes | str) -> str:
    return counts.decode("ascii") if isinstance(counts, (bytes, bytearray)) else counts


def _to_rows(table: pa.Table | pa.RecordBatch) -> list[dict]:
    """Rows as dicts, `created_at` as an ISO 8601 string (formatted by Arrow: Python datetimes are slow)."""
    names = table.column_names
    cols = []
    for name in names:
        col = table.column(name)
        if name == "created_at":
            iso = pc.binary_join_element_wise(pc.strftime(col, format="%Y-%m-%dT%H:%M:%S"), "+00:00", "")
            cols.append(iso.to_pylist())
        else:
            cols.append(col.to_pylist())
    return [dict(zip(names, values)) for values in zip(*cols)]


def _image_groups(table: pa.Table, plan: _Plan, chunk_rows: int = 4096) -> Iterator[tuple[int, list[dict]]]:
    """(plan position, rows) per image of one tar's spooled rows, images in plan order, each image's masks in
    store order. Rows become Python dicts a chunk of whole images at a time (not the whole tar at once)."""
    pos = plan.lookup(table.column("image_id"))
    order = np.argsort(pos, kind="stable")
    table = table.take(pa.array(order))
    images, counts = np.unique(pos[order], return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    i = 0
    while i < len(images):
        j, rows_in_chunk = i, 0
        while j < len(images) and (j == i or rows_in_chunk + counts[j] <= chunk_rows):
            rows_in_chunk += int(counts[j])
            j += 1
        first = int(starts[i])
        rows = _to_rows(table.slice(first, rows_in_chunk))
        for k in range(i, j):
            a = int(starts[k]) - first
            yield int(images[k]), rows[a:a + int(counts[k])]
        i = j


def _lineage(row: dict) -> dict:
    """The lineage fields of a store row, JSON-ready (`source`/`history` parsed back from their JSON)."""
    created = row.get("created_at")
    if created is not None and not isinstance(created, str):
        created = created.isoformat()
    return {
        "image_id": row["image_id"],
        "mask_id": row["mask_id"],
        "stage": row["stage"],
        "origin": row.get("origin"),
        "round": row["round"],
        "model_version": row.get("model_version"),
        "annotator": row.get("annotator"),
        "verified": bool(row.get("verified")),
        "source": json.loads(row["source"]) if row.get("source") else None,
        "clicks": row.get("clicks"),
        "lead_time_s": row.get("lead_time_s"),
        "prefill_iou": row.get("prefill_iou"),
        "history": json.loads(row["history"]) if row.get("history") else None,
        "created_at": created,
    }


def sa1b_annotation(row: dict, ann_id: int) -> dict:
    """A store row -> one SA-1B annotation (SA-1B's keys, plus our lineage under "sa_engine")."""
    return {
        "id": ann_id,
        "segmentation": {"size": [row["height"], row["width"]], "counts": _counts_str(row["rle"])},
        "bbox": [float(v) for v in row["bbox"]],
        "area": int(row["area"]),
        "predicted_iou": row["predicted_iou"],
        "stability_score": row["stability_score"],
        "crop_box": [float(v) for v in row["crop_box"]] if row.get("crop_box") is not None
        else [0.0, 0.0, float(row["width"]), float(row["height"])],
        "point_coords": [[float(x), float(y)] for x, y in (row.get("point_coords") or [])],
        **({"prompt_text": row["prompt_text"]} if row.get("prompt_text") is not None else {}),
        LINEAGE_KEY: _lineage(row),
    }


def coco_annotation(row: dict, ann_id: int, image_number: int, category_id: int = COCO_CATEGORY["id"]) -> dict:
    """A store row -> one COCO instance annotation (iscrowd 0, RLE counts as str); category: "object", or the
    concept stage's phrase (`coco_categories`)."""
    return {
        "id": ann_id,
        "image_id": int(image_number),
        "category_id": int(category_id),
        "segmentation": {"size": [row["height"], row["width"]], "counts": _counts_str(row["rle"])},
        "area": int(row["area"]),
        "bbox": [float(v) for v in row["bbox"]],
        "iscrowd": 0,
        "predicted_iou": row["predicted_iou"],
        "stability_score": row["stability_score"],
        "point_coords": [[float(x), float(y)] for x, y in (row.get("point_coords") or [])],
        "crop_box": [float(v) for v in row["crop_box"]] if row.get("crop_box") is not None else None,
        LINEAGE_KEY: {"image_id": row["image_id"], "mask_id": row["mask_id"], "stage": row["stage"],
                      "origin": row.get("origin"), "round": row["round"],
                      "model_version": row.get("model_version"), "verified": bool(row.get("verified"))},
    }


def coco_categories(phrases: dict[str, int]) -> list[dict]:
    """"object" (id 1) for masks without a phrase, then one category per concept phrase."""
    return [COCO_CATEGORY] + [{"id": i, "name": name, "supercategory": "concept"}
                              for name, i in sorted(phrases.items(), key=lambda kv: kv[1])]


def sa1b_to_records(image_json: dict) -> list[MaskRecord]:
    """One SA-1B image JSON written by `export_sa1b` -> its MaskRecords (the inverse of the export)."""
    img = image_json["image"]
    out: list[MaskRecord] = []
    for ann in image_json["annotations"]:
        lin = ann[LINEAGE_KEY]
        h, w = ann["segmentation"]["size"]
        out.append(MaskRecord(
            image_id=lin["image_id"], mask_id=lin["mask_id"], height=int(h), width=int(w),
            rle={"size": [int(h), int(w)], "counts": ann["segmentation"]["counts"].encode("ascii")},
            area=int(ann["area"]), bbox=list(ann["bbox"]), stage=lin["stage"], round=int(lin["round"]),
            model_version=lin.get("model_version"), predicted_iou=ann.get("predicted_iou"),
            stability_score=ann.get("stability_score"), point_coords=[list(p) for p in ann["point_coords"]],
            crop_box=list(ann["crop_box"]), prompt_text=ann.get("prompt_text"), origin=lin.get("origin"), annotator=lin.get("annotator"),
            verified=bool(lin.get("verified")), source=lin.get("source"), clicks=lin.get("clicks"),
            lead_time_s=lin.get("lead_time_s"), prefill_iou=lin.get("prefill_iou"), history=lin.get("history"),
            created_at=datetime.fromisoformat(lin["created_at"]),
        ))
        if (int(h), int(w)) != (int(img["height"]), int(img["width"])):
            raise CorruptExportError(f"{img.get('file_name')}: annotation {ann['id']} is {h}x{w}, "
                                     f"the image {img['height']}x{img['width']}")
    return out
