"""The YOLO segmentation export: Ultralytics' layout, what most instance-segmentation training starts from.

    data.yaml                  path, train / val (/ test) image folders, names {class id: name}
    images/<split>/<n>.<ext>   the image files (n: the image's number in this export, zero-padded)
    labels/<split>/<n>.txt     one object per line: `class x1 y1 x2 y2 ...`, vertices normalised by width / height
    images.json                n -> our image id (the file names are numbers, so any image id fits)

One polygon per object (storage/polygons.py: vertices on the boundary pixels' centres, as cv2.fillPoly and the
loaders built on it read them; parts and holes joined by zero-width cuts). Class 0 is "object"; each concept
phrase gets the next id. Scores and lineage are not kept (images.json keeps the image ids). The export's summary
holds each polygon's IoU to its mask, rasterised back as the loaders do.
"""
from __future__ import annotations

import json
import time

import cv2
import numpy as np

from storage.exports.common import EmptySelectionError, ExportError, _sha256_file
from storage.exports.coco import DEFAULT_TOLERANCE_PX, polygon_iou_summary
from storage.exports.plan import ExportFilters, _Plan
from storage.exports.sa1b import _Images, exportable, image_buckets
from storage.exports.targets import _run_export, _Target
from storage.images import ImageSource
from storage.polygons import mask_to_polygons
from storage.rle import decode_rles
from storage.shards import MaskStore

YOLO_COLUMNS = ["image_id", "mask_id", "height", "width", "rle", "prompt_text"]
DEFAULT_YOLO_SPLITS = {"train": 0.9, "val": 0.1}

def export_yolo(store: MaskStore, out: str, images: ImageSource, filters: ExportFilters = ExportFilters(),
                splits: dict[str, float] | None = None, overwrite: bool = False,
                s3_endpoint_url: str | None = None, s3_region: str | None = None,
                tolerance_px: float = DEFAULT_TOLERANCE_PX, images_per_bucket: int = 1000,
                spool_buffer_mb: float = 32.0) -> dict:
    """Export the selected masks in Ultralytics' YOLO segmentation layout under `out` (a folder or s3:// prefix).
    splits: by image, stable per image id (default train 0.9 / val 0.1). Returns the summary (images, masks,
    per_split, classes, polygon_iou, skipped)."""
    splits = dict(splits or DEFAULT_YOLO_SPLITS)
    if tolerance_px < 0:
        raise ExportError(f"tolerance_px={tolerance_px}: must be >= 0")
    split_names = list(splits)

    def body(target: _Target, plan: _Plan) -> dict:
        source = _Images(images)
        _, groups = image_buckets(store, plan, filters, target, len(split_names), images_per_bucket,
                                  spool_buffer_mb, columns=YOLO_COLUMNS)
        classes: dict[str, int] = {"object": 0}
        files, ious, names = [], [], {}
        counts = {name: {"images": 0, "masks": 0} for name in split_names}
        for _t, (s, _k), image_groups in groups:
            split = split_names[s]
            for im in exportable(image_groups, plan, store, source):
                p, number, data, ext, rows = im.p, im.number, im.data, im.ext, im.rows
                lines = [_label_line(r, classes, tolerance_px, ious) for r in rows]
                stem = f"{number:08d}"
                for rel, payload in ((f"images/{split}/{stem}.{ext}", data),
                                     (f"labels/{split}/{stem}.txt", ("\n".join(x for x in lines if x) + "\n").encode())):
                    files.append(_put(target, rel, payload, split))
                names[stem] = plan.ids[p]
                counts[split]["images"] += 1
                counts[split]["masks"] += len(rows)
        n_images = sum(c["images"] for c in counts.values())
        if n_images == 0:
            raise EmptySelectionError(f"no image of the selection could be exported ({len(plan.skipped)} skipped): "
                                      "nothing written")
        files.append(_put(target, "images.json", json.dumps(names, indent=0).encode(), None))
        files.append(_put(target, "data.yaml", _data_yaml(split_names, classes).encode(), None))
        return {"files": files, "images": n_images, "masks": sum(c["masks"] for c in counts.values()),
                "per_split": counts, "classes": {v: k for k, v in classes.items()},
                "polygon_iou": polygon_iou_summary(ious), "tolerance_px": tolerance_px,
                "skipped": plan.skipped, "skipped_masks": plan.skipped_masks}

    return _run_export("yolo-seg", out, overwrite, s3_endpoint_url, body, filters, splits, store, s3_region)

def _label_line(row: dict, classes: dict[str, int], tolerance_px: float, ious: list[float]) -> str:
    """One object's label line (empty when the mask has no polygon), its polygon's IoU appended to `ious`."""
    h, w = int(row["height"]), int(row["width"])
    mask = decode_rles([{"size": [h, w], "counts": row["rle"]}])[0]
    polygons = mask_to_polygons(mask, tolerance_px, frame="center", join_parts=True)
    if not polygons:
        ious.append(0.0)
        return ""
    xy = np.asarray(polygons[0]).reshape(-1, 2)
    back = np.zeros((h, w), np.uint8)
    cv2.fillPoly(back, [np.round(xy).astype(np.int32)], 1)  # as the YOLO loaders rasterise a label
    union = int((back.astype(bool) | mask).sum())
    ious.append(float((back.astype(bool) & mask).sum() / union) if union else 1.0)
    cls = classes.setdefault(row["prompt_text"], len(classes)) if row.get("prompt_text") else 0
    norm = xy / np.array([w, h], np.float64)
    return f"{cls} " + " ".join(f"{v:.6f}" for v in norm.clip(0.0, 1.0).flatten())

def _data_yaml(split_names: list[str], classes: dict[str, int]) -> str:
    """Ultralytics' dataset file: `path: .` (the folder it sits in), the split folders, the class names."""
    train = "train" if "train" in split_names else split_names[0]
    val = "val" if "val" in split_names else train
    lines = ["path: .", f"train: images/{train}", f"val: images/{val}"]
    if "test" in split_names:
        lines.append("test: images/test")
    lines.append("names:")
    lines += [f"  {i}: {json.dumps(name)}" for name, i in sorted(classes.items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"

def _put(target: _Target, rel: str, payload: bytes, split: str | None) -> dict:
    path = target.scratch / f"file-{time.monotonic_ns()}"
    path.write_bytes(payload)
    entry = {"path": rel, "bytes": len(payload), "sha256": _sha256_file(path), **({"split": split} if split else {})}
    target.put(rel, path)
    return entry

