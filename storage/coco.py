"""The one COCO reader: ground truth, holdouts, the bootstrap set and teams' own labels read through here.

A COCO instances file: `images` (id, file_name, height, width), `annotations` (id, image_id, segmentation as
polygons, uncompressed RLE or compressed RLE, optional `parent_id` for parts) and `categories`. Every
segmentation becomes compressed RLE (`segmentation_rle`), decoded by pycocotools, so every reader sees the
same pixels. The exports write COCO (storage/exports/coco.py); this reads it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from storage.images import image_id_from_key, match_file_names


@dataclass
class CocoImage:
    """One image of a COCO file and its annotations (dicts as written, in file order)."""

    coco_id: int
    file_name: str
    height: int
    width: int
    annotations: list[dict] = field(default_factory=list)


@dataclass
class GTObject:
    """A ground-truth object of one image. mask: (H, W) bool at the image's size; parent_id: the object this is a
    part of (COCO `parent_id`), None for a whole object."""

    ann_id: int
    mask: np.ndarray
    parent_id: int | None = None


def read_coco(path: str | Path, categories: dict[int, str] | None = None) -> list[CocoImage]:
    """A COCO instances JSON -> its images with their annotations, in file order; with `categories`, that dict
    is filled with the file's category id -> name (a file with malformed categories leaves it empty). Raises
    ValueError (one line, naming the file) for a file that is not COCO instances JSON."""
    try:
        coco = json.loads(Path(path).read_text(encoding="utf-8"))
        images = {im["id"]: CocoImage(im["id"], im["file_name"], int(im["height"]), int(im["width"]))
                  for im in coco.get("images", [])}  # a file with no images is an empty set
        for a in coco.get("annotations", []):
            if a["image_id"] in images:
                images[a["image_id"]].annotations.append(a)
        if categories is not None:
            try:
                categories.update({int(c["id"]): str(c["name"]) for c in coco.get("categories", [])})
            except (KeyError, TypeError, ValueError):
                pass
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not COCO instances JSON ({type(e).__name__}: {e})") from None
    return list(images.values())


def segmentation_rle(segmentation, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, uncompressed RLE or compressed RLE with counts as str or bytes) -> compressed
    RLE {"size": [h, w], "counts": bytes}."""
    if isinstance(segmentation, list):  # polygons: one object may have several parts
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, *segmentation["size"])
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) bool of a COCO segmentation."""
    return mask_utils.decode(segmentation_rle(segmentation, height, width)).astype(bool)


def load_ground_truth(coco_json: str | Path, image_ids: list[str] | None = None) -> dict[str, list[GTObject]]:
    """COCO instances (optional `parent_id`) -> image_id -> objects.

    image_id = the file name's id as storage/images.py derives it; with `image_ids` (the source's), file
    names are matched to them by `storage.images.match_file_names` (folders in `file_name` allowed), and a
    file none of whose names matches any image raises ValueError naming both sides."""
    images = read_coco(coco_json)
    names = {im.coco_id: image_id_from_key(im.file_name) for im in images}
    if image_ids is not None:
        matched = match_file_names([im.file_name for im in images], image_ids)
        if images and not matched:
            raise ValueError(f"ground truth {coco_json} matches no image of the source: its file names look like "
                             f"{images[0].file_name!r}, the source's image ids like "
                             f"{(list(image_ids) or ['(no images)'])[0]!r}")
        names = {im.coco_id: matched[im.file_name] for im in images if im.file_name in matched}
    out: dict[str, list[GTObject]] = {n: [] for n in names.values()}
    for im in images:
        if im.coco_id not in names:
            continue  # an image the source does not hold
        out[names[im.coco_id]] += [GTObject(int(a["id"]), decode_segmentation(a["segmentation"], im.height, im.width),
                                            a.get("parent_id")) for a in im.annotations]
    return out


OBJECT_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def rle_annotation(ann_id: int, image_coco_id: int, rle: dict, **extra) -> dict:
    """A COCO annotation of the class-agnostic category "object" from compressed RLE: counts as str, area and bbox
    (XYWH pixels) from the RLE, `extra` keys (e.g. parent_id) added."""
    counts = rle["counts"]
    return {"id": int(ann_id), "image_id": int(image_coco_id), "category_id": OBJECT_CATEGORY["id"], "iscrowd": 0,
            "segmentation": {"size": [int(v) for v in rle["size"]],
                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)], **extra}


def write_coco(path: str | Path, images: list[CocoImage], info: dict | None = None,
               categories: list[dict] | None = None) -> dict:
    """Write a COCO instances JSON atomically (a temporary file beside it, then a rename): `images` with their
    annotations as given (see rle_annotation). Returns {images, masks}."""
    path = Path(path)
    doc = {**({"info": info} if info else {}),
           "images": [{"id": im.coco_id, "file_name": im.file_name, "height": im.height, "width": im.width}
                      for im in images],
           "annotations": [a for im in images for a in im.annotations],
           "categories": categories or [OBJECT_CATEGORY]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return {"images": len(doc["images"]), "masks": len(doc["annotations"])}
