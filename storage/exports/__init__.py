"""SA-1B and COCO exports of the mask store: filtered, split by a stable hash, streamed, atomic.

Two formats (a module each: `sa1b.py`, `coco.py`; the filters and plan in `plan.py`, the output targets and
the frame every export runs in in `targets.py`, rows -> JSON in `rows.py`, reading back in `read.py`):
- **sa1b**: SA-1B's own layout. One JSON per image (`image`: image_id, width, height, file_name;
  `annotations`: id, segmentation as COCO RLE with counts as str, bbox XYWH, area, predicted_iou,
  stability_score, crop_box XYWH, point_coords; `prompt_text` for the concept stage's masks) beside the image file, packed into tar shards of N
  images (`sa_000000.tar`, …). Our lineage rides under the key `"sa_engine"` of each image and
  annotation, so SA-1B readers that know only SA-1B's keys still work. Human masks have no predicted
  IoU or stability score: those fields are `null`.
- **coco**: one COCO instances JSON per split (`instances_<split>.json`): RLE segmentations, the
  class-agnostic category "object" (id 1) and one category per concept phrase (ids 2, 3, …), iscrowd 0.

Both end with `index.json` (the files with their sha256, counts, filters, splits): it is written last,
so an export without it is incomplete. Locally everything is staged in a sibling folder that replaces
the output by rename; on S3 the old index is deleted first, stale objects after, the new index last.
Re-running therefore replaces an export, it never mixes two.

Memory stays flat in the number of masks: masks stream from the store batch by batch. SA-1B needs
each image's masks together (they may sit in several shards), so rows are first spooled to local
Arrow files, one folder per output tar, and each tar is then built from its own spool alone. What is
held for the whole run is one small row per image (id, size, mask count).
"""
from __future__ import annotations

from storage.exports.coco import export_coco
from storage.exports.common import (COCO_CATEGORY, DEFAULT_SPLITS, FORMATS, INDEX_NAME, LINEAGE_KEY, MARKER_NAME,
                                    CorruptExportError, EmptySelectionError, ExportError, OutputExistsError)
from storage.exports.plan import (ExportFilters, assign_splits, build_plan, image_hash_unit, parse_rounds,
                                  parse_splits, read_image_ids)
from storage.exports.read import iter_sa1b_tar, open_export_file, read_index
from storage.exports.rows import coco_annotation, coco_categories, sa1b_annotation, sa1b_to_records
from storage.exports.sa1b import export_sa1b
from storage.exports.hf import export_hf
from storage.exports.webdataset import export_webdataset
from storage.exports.yolo import export_yolo
from storage.exports.targets import _S3Target, collect_export_garbage  # noqa: F401 (tests crash its writes)
from storage.images import ImageSource
from storage.shards import MaskStore

__all__ = ["COCO_CATEGORY", "DEFAULT_SPLITS", "FORMATS", "INDEX_NAME", "LINEAGE_KEY", "MARKER_NAME",
           "CorruptExportError", "EmptySelectionError", "ExportError", "ExportFilters", "OutputExistsError",
           "assign_splits", "build_plan", "coco_annotation", "coco_categories", "collect_export_garbage", "export",
           "export_coco", "export_hf", "export_sa1b", "export_webdataset", "export_yolo", "image_hash_unit", "iter_sa1b_tar", "open_export_file", "parse_rounds",
           "parse_splits", "read_image_ids", "read_index", "sa1b_annotation", "sa1b_to_records"]


def export(fmt: str, store: "MaskStore", out: str, images: "ImageSource | None" = None, **kw) -> dict:
    """Dispatch on the format name (FORMATS). Every format takes the same filters, splits, overwrite and S3
    options; `images_per_tar` sizes the tar-like formats (sa1b, webdataset) and the hf files, `tolerance_px` the
    polygon formats."""
    tar_size = kw.pop("images_per_tar", None)
    tolerance = kw.pop("tolerance_px", None)
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt in ("sa1b", "yolo-seg", "hf", "webdataset") and images is None:
        raise ExportError(f"{fmt} export: needs the image source (the images go into it)")
    poly = {} if tolerance is None else {"tolerance_px": tolerance}
    if fmt == "sa1b":
        return export_sa1b(store, out, images, **kw, **({} if tar_size is None else {"images_per_tar": tar_size}))
    if fmt in ("coco", "coco-polygons"):
        return export_coco(store, out, polygons=fmt == "coco-polygons", **kw, **poly)
    if fmt == "yolo-seg":
        return export_yolo(store, out, images, **kw, **poly)
    if fmt == "hf":
        return export_hf(store, out, images, **kw, **({} if tar_size is None else {"images_per_file": tar_size}))
    return export_webdataset(store, out, images, **kw, **({} if tar_size is None else {"images_per_shard": tar_size}))
