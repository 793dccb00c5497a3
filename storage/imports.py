"""Bringing earlier work in: COCO (RLE or polygons) and YOLO segmentation labels become verified masks.

Imported masks are stage "manual", origin "imported", round 0, verified, with where they came from in `source`
({"imported_from": file, "format", "label": the annotation id or the label line}); a category or class other than
"object" becomes the mask's `prompt_text`. Their images count as done by the manual stage, so the rounds do not
ask people to draw them again, and retraining uses them as it uses people's masks. Mask ids are derived from the
image and the label, and the masks are upserted: importing the same file again replaces, never duplicates.

Images are the run's: a label whose image the image source does not hold is skipped with one line saying so.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import yaml

from storage.coco import read_coco, segmentation_rle
from storage.images import BadImage, ImageSource, match_file_names
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_masks
from storage.shards import MaskStore

ORIGIN = "imported"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def import_coco(store: MaskStore, source: ImageSource, coco_json: str | Path, round: int = 0) -> dict:
    """A COCO instances file's masks into `store`, matched to `source`'s images by file name. Returns {images,
    masks, skipped: [{thing, reason}]}."""
    path = Path(coco_json)
    doc_categories: dict[int, str] = {}
    images = read_coco(path, doc_categories)  # the file is parsed once
    ids = [r.image_id for r in source.list()]
    matched = match_file_names([im.file_name for im in images], ids)
    by_image: dict[str, list[MaskRecord]] = {}
    skipped = []
    for im in images:
        image_id = matched.get(im.file_name)
        if image_id is None:
            skipped.append({"thing": im.file_name, "reason": "not an image of the image source"})
            continue
        for ann in im.annotations:
            try:
                rle = segmentation_rle(ann["segmentation"], im.height, im.width)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                skipped.append({"thing": f"{path.name} annotation {ann.get('id')}",
                                "reason": f"unreadable segmentation ({type(e).__name__})"})
                continue
            name = doc_categories.get(ann.get("category_id"))
            by_image.setdefault(image_id, []).append(_record(image_id, rle, round, path, "coco", ann.get("id"), name))
    return _write(store, by_image, round, skipped)


def import_yolo(store: MaskStore, source: ImageSource, folder: str | Path, round: int = 0) -> dict:
    """A YOLO segmentation folder (data.yaml, labels/**/<stem>.txt) into `store`: each label file is matched to
    the image source's image of the same stem (or, in sa-engine's own export, the image images.json names); each line `class x1 y1 x2 y2 ...` (normalised vertices on pixel
    centres) is filled as the YOLO loaders fill it. Returns {images, masks, skipped: [{thing, reason}]}."""
    folder = Path(folder)
    names = _yolo_names(folder)
    by_stem: dict[str, list[str]] = {}
    for ref in source.list():
        by_stem.setdefault(Path(ref.image_id).stem, []).append(ref.image_id)
    if (folder / "images.json").is_file():  # our own export: its files are numbered, images.json names them
        known = {r.image_id for r in source.list()}
        by_stem.update({stem: [i] for stem, i in json.loads((folder / "images.json").read_text()).items()
                        if i in known})
    by_image: dict[str, list[MaskRecord]] = {}
    skipped = []
    for label in sorted((folder / "labels").rglob("*.txt") if (folder / "labels").is_dir() else folder.rglob("*.txt")):
        candidates = by_stem.get(label.stem, [])
        if len(candidates) != 1:
            skipped.append({"thing": str(label), "reason": "no image of that name in the image source" if not
                            candidates else f"{len(candidates)} images of that name in the image source"})
            continue
        image_id = candidates[0]
        try:
            h, w = source.load(source.ref(image_id)).original_size
        except BadImage as e:
            skipped.append({"thing": str(label), "reason": str(e)})
            continue
        for n, line in enumerate(label.read_text().splitlines(), 1):
            values = line.split()
            if not values:
                continue
            try:
                cls, xy = int(values[0]), np.asarray([float(v) for v in values[1:]], np.float64).reshape(-1, 2)
                if len(xy) < 3:
                    raise ValueError("fewer than 3 vertices")
            except ValueError as e:
                skipped.append({"thing": f"{label}:{n}", "reason": f"not a segmentation label ({e})"})
                continue
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [np.round(xy * np.array([w, h])).astype(np.int32)], 1)
            rle = encode_masks(mask.astype(bool)[None])[0]
            by_image.setdefault(image_id, []).append(
                _record(image_id, rle, round, label, "yolo-seg", f"{label.name}:{n}", names.get(cls)))
    return _write(store, by_image, round, skipped)


def _record(image_id: str, rle: dict, round: int, path: Path, fmt: str, label, category: str | None) -> MaskRecord:
    return MaskRecord.from_rle(
        image_id, make_mask_id(image_id, ORIGIN, path.name, label), rle, "manual", round, origin=ORIGIN,
        annotator=ORIGIN, verified=True, prompt_text=category if category and category != "object" else None,
        source={"imported_from": str(path), "format": fmt, "label": label})


def _write(store: MaskStore, by_image: dict[str, list[MaskRecord]], round: int, skipped: list) -> dict:
    records = [r for recs in by_image.values() for r in recs if r.area > 0]
    if records:
        store.upsert(records, stage="manual", round=round, model_version=None)
        with store.writer("manual", round, None) as w:  # their images count as drawn
            for image_id, recs in by_image.items():
                w.image_done(image_id, len(recs))
            w.commit()
    return {"images": len(by_image), "masks": len(records), "skipped": skipped}


def _yolo_names(folder: Path) -> dict[int, str]:
    """Class id -> name from data.yaml (a list or a mapping); {} without one."""
    for name in ("data.yaml", "dataset.yaml"):
        if (folder / name).is_file():
            names = (yaml.safe_load((folder / name).read_text()) or {}).get("names", {})
            return dict(enumerate(names)) if isinstance(names, list) else {int(k): str(v) for k, v in names.items()}
    return {}
