"""The COCO export: one instances JSON per split, annotations streamed to a file."""
from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from storage.exports.common import (
    ExportError,
    _COCO_COLUMNS,
    COCO_CATEGORY,
    DEFAULT_SPLITS,
    LINEAGE_KEY,
    EmptySelectionError,
    _sha256_file,
)
from storage.exports.plan import (
    ExportFilters,
    _Plan,
)
from storage.exports.rows import (
    _to_rows,
    coco_annotation,
    coco_categories,
)
from storage.exports.targets import (
    _run_export,
    _Target,
)
from storage.polygons import mask_to_polygons, polygons_to_mask
from storage.records import SCHEMA_VERSION
from storage.rle import decode_rles
from storage.shards import MaskStore

log = logging.getLogger("storage.exports")
DEFAULT_TOLERANCE_PX = 0.25  # polygon simplification: lossless on the demo's and synthetic masks (docs/exports.md)

def export_coco(store: "MaskStore", out: str, filters: ExportFilters = ExportFilters(),
                splits: dict[str, float] | None = None, overwrite: bool = False,
                s3_endpoint_url: str | None = None, s3_region: str | None = None, polygons: bool = False,
                tolerance_px: float = DEFAULT_TOLERANCE_PX) -> dict:
    """Export the selected masks as one COCO instances JSON per split: `instances_<split>.json` under `out`.

    Image ids are the images' numeric ids in this export (1-based rank of the image id); each image
    and annotation carries our ids under "sa_engine". `file_name` is our image id, which is the
    image's key relative to the image source (images.source). Annotations stream to a local file;
    the JSON is then assembled by copying.

    polygons (format "coco-polygons"): segmentations as polygons in pixel corners (storage/polygons.py: one per
    part, holes joined by a zero-width cut), simplified to `tolerance_px`; each polygon set is rasterised back
    as pycocotools does and its IoU to the stored mask goes into the summary's `polygon_iou` (mean, min, how many
    below 0.9). area and bbox stay the mask's.
    """
    if tolerance_px < 0:
        raise ExportError(f"tolerance_px={tolerance_px}: must be >= 0")
    splits = dict(splits or DEFAULT_SPLITS)
    split_names = list(splits)

    def body(target: _Target, plan: _Plan) -> dict:
        parts = [_JsonArrayFile(target.scratch / f"{name}.annotations.part") for name in split_names]
        counts = {name: {"images": 0, "masks": 0} for name in split_names}
        ann_id = 0
        phrases: dict[str, int] = {}  # concept phrase -> category id (2, 3, … in order of first appearance)
        damaged = np.zeros(len(plan.ids), np.int64)
        ious: list[float] = []
        for batch in store.iter_batches(columns=_COCO_COLUMNS, **filters.store_kwargs()):
            pos = plan.lookup(batch.column("image_id"))
            for row, p in zip(_to_rows(batch), pos.tolist()):
                if p < 0 or not plan.keep[p]:
                    continue
                if plan.damaged(store, row):
                    damaged[p] += 1
                    continue
                ann_id += 1
                name = split_names[plan.split[p]]
                phrase = row.get("prompt_text")
                category = COCO_CATEGORY["id"] if phrase is None else phrases.setdefault(phrase, len(phrases) + 2)
                ann = coco_annotation(row, ann_id, int(plan.number[p]), category)
                if polygons:
                    ann["segmentation"] = _polygons(row, tolerance_px, ious)
                parts[plan.split[p]].write(ann)
                counts[name]["masks"] += 1
        for part in parts:
            part.close()
        for p in np.flatnonzero(plan.keep & (damaged > 0) & (damaged >= plan.n_masks)):
            plan.skip(int(p), "every mask of it is damaged (see skipped_masks); its size is not to be trusted")
        files = []
        created = datetime.now(timezone.utc)
        for s, name in enumerate(split_names):
            path = target.scratch / f"instances_{name}.json"
            with open(path, "w") as f:
                f.write('{"info": ' + json.dumps({"description": f"sa-engine export, split {name}",
                                                  "version": str(SCHEMA_VERSION),
                                                  "date_created": created.isoformat()}))
                f.write(', "licenses": [], "categories": ' + json.dumps(coco_categories(phrases)) + ', "images": [')
                first = True
                for p in np.flatnonzero((plan.split == s) & plan.keep):
                    image_id = plan.ids[p]
                    entry = {"id": int(plan.number[p]), "width": int(plan.width[p]), "height": int(plan.height[p]),
                             "file_name": image_id, LINEAGE_KEY: {"image_id": image_id}}
                    f.write(("" if first else ", ") + json.dumps(entry))
                    first = False
                    counts[name]["images"] += 1
                f.write('], "annotations": ')
                parts[s].copy_into(f)
                f.write("}\n")
            parts[s].path.unlink()
            rel = f"instances_{name}.json"
            files.append({"path": rel, "split": name, **counts[name], "bytes": path.stat().st_size,
                          "sha256": _sha256_file(path)})
            target.put(rel, path)
        n_images = sum(c["images"] for c in counts.values())
        if n_images == 0:
            raise EmptySelectionError(f"no image of the selection could be exported ({len(plan.skipped)} skipped, "
                                      f"first: {plan.skipped[0]['image_id']}: {plan.skipped[0]['reason']}): "
                                      f"nothing written")
        result = {"files": files, "images": n_images, "masks": ann_id, "per_split": counts,
                  "skipped": plan.skipped, "skipped_masks": plan.skipped_masks}
        if polygons:
            result["polygon_iou"] = polygon_iou_summary(ious)
            result["tolerance_px"] = tolerance_px
        return result

    return _run_export("coco-polygons" if polygons else "coco", out, overwrite, s3_endpoint_url, body, filters,
                       splits, store, s3_region)


def _polygons(row: dict, tolerance_px: float, ious: list[float]) -> list[list[float]]:
    """The row's mask as COCO polygons; its round-trip IoU appended to `ious`."""
    mask = decode_rles([{"size": [row["height"], row["width"]], "counts": row["rle"]}])[0]
    polys = mask_to_polygons(mask, tolerance_px)
    back = polygons_to_mask(polys, row["height"], row["width"])
    union = int((back | mask).sum())
    ious.append(float((back & mask).sum() / union) if union else 1.0)
    return polys


def polygon_iou_summary(ious: list[float]) -> dict:
    """{mean, min, below_0_9, masks} of per-mask polygon-vs-mask IoUs."""
    if not ious:
        return {"mean": None, "min": None, "below_0_9": 0, "masks": 0}
    return {"mean": round(float(np.mean(ious)), 5), "min": round(float(np.min(ious)), 5),
            "below_0_9": int(sum(i < 0.9 for i in ious)), "masks": len(ious)}



class _JsonArrayFile:
    """A JSON array written one element at a time to a local file, later copied into a larger document."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "w")
        self.f.write("[")
        self.first = True

    def write(self, obj: dict) -> None:
        self.f.write(("" if self.first else ", ") + json.dumps(obj))
        self.first = False

    def close(self) -> None:
        self.f.write("]")
        self.f.close()

    def copy_into(self, dest) -> None:
        with open(self.path) as src:
            shutil.copyfileobj(src, dest, 1 << 20)
