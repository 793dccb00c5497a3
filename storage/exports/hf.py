"""The Hugging Face `datasets` export: a data set folder a team loads with `datasets.load_dataset(folder)` and
publishes with `push_to_hub` (or uploads as it is).

    README.md                                   the data set card: its splits and files (the Hub reads this)
    data/<split>-00000-of-00003.parquet, ...    one row per image, `images_per_file` images a file

Columns: `image` (datasets' Image feature: the file's bytes and name), `image_id`, `width`, `height` and `objects`:
one entry per mask with `segmentation` as COCO RLE ({size, counts as str}: pycocotools decodes it), `bbox` (XYWH
pixels), `area`, `predicted_iou`, `stability_score`, `category` (the concept phrase or "object") and the lineage
(mask_id, stage, origin, round, model_version, annotator, verified, created_at). The features are written into
each file's schema metadata, where `datasets` reads them.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from storage.exports.common import DEFAULT_SPLITS, EmptySelectionError, ExportError, _sha256_file
from storage.exports.plan import ExportFilters, _Plan
from storage.exports.rows import _counts_str
from storage.exports.sa1b import _SA1B_COLUMNS, _Images, exportable, image_buckets
from storage.exports.targets import _run_export, _Target
from storage.images import ImageSource
from storage.shards import MaskStore

OBJECT = pa.struct([
    ("mask_id", pa.string()),
    ("segmentation", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
    ("bbox", pa.list_(pa.float64())), ("area", pa.int64()),
    ("predicted_iou", pa.float64()), ("stability_score", pa.float64()), ("category", pa.string()),
    ("stage", pa.string()), ("origin", pa.string()), ("round", pa.int32()), ("model_version", pa.string()),
    ("annotator", pa.string()), ("verified", pa.bool_()), ("created_at", pa.string()),
])
SCHEMA = pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("image_id", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("objects", pa.list_(OBJECT)),
])


def hf_features(schema: pa.Schema) -> dict:
    """`datasets`' feature description of SCHEMA (the JSON it keeps in a Parquet file's metadata)."""
    def feature(t: pa.DataType, name: str = ""):
        if name == "image":
            return {"_type": "Image"}
        if pa.types.is_struct(t):
            return {t.field(i).name: feature(t.field(i).type) for i in range(t.num_fields)}
        if pa.types.is_list(t):
            return {"feature": feature(t.value_type), "_type": "List"}
        dtype = {pa.string(): "string", pa.binary(): "binary", pa.int32(): "int32", pa.int64(): "int64",
                 pa.float64(): "float64", pa.bool_(): "bool"}[t]
        return {"dtype": dtype, "_type": "Value"}
    return {f.name: feature(f.type, f.name) for f in schema}


def export_hf(store: MaskStore, out: str, images: ImageSource, filters: ExportFilters = ExportFilters(),
              splits: dict[str, float] | None = None, overwrite: bool = False, s3_endpoint_url: str | None = None,
              s3_region: str | None = None, images_per_file: int = 500, spool_buffer_mb: float = 32.0) -> dict:
    """Export the selected masks as a Hugging Face `datasets` folder under `out` (a folder or s3:// prefix)."""
    splits = dict(splits or DEFAULT_SPLITS)
    if images_per_file < 1:
        raise ExportError(f"images_per_file={images_per_file}: must be at least 1")
    split_names = list(splits)
    schema = SCHEMA.with_metadata({"huggingface": json.dumps({"info": {"features": hf_features(SCHEMA)}})})

    def body(target: _Target, plan: _Plan) -> dict:
        source = _Images(images)
        buckets, groups = image_buckets(store, plan, filters, target, len(split_names), images_per_file,
                                        spool_buffer_mb, columns=_SA1B_COLUMNS)
        in_split = {s: sum(1 for b in buckets if b[0] == s) for s in range(len(split_names))}
        files, per_split = [], {name: {"images": 0, "masks": 0, "files": 0} for name in split_names}
        for t, (s, k), image_groups in groups:
            split, table_rows = split_names[s], []
            for im in exportable(image_groups, plan, store, source):
                table_rows.append({"image": {"bytes": im.data, "path": f"{im.number:08d}.{im.ext}"},
                                   "image_id": plan.ids[im.p], "width": im.width, "height": im.height,
                                   "objects": [_object(r) for r in im.rows]})
            if not table_rows:
                continue
            rel = f"data/{split}-{k:05d}-of-{in_split[s]:05d}.parquet"
            path = target.scratch / f"hf-{t}.parquet"
            pq.write_table(pa.Table.from_pylist(table_rows, schema=schema), path, compression="zstd")
            n_masks = sum(len(r["objects"]) for r in table_rows)
            files.append({"path": rel, "split": split, "images": len(table_rows), "masks": n_masks,
                          "bytes": path.stat().st_size, "sha256": _sha256_file(path)})
            target.put(rel, path)
            per_split[split]["images"] += len(table_rows)
            per_split[split]["masks"] += n_masks
            per_split[split]["files"] += 1
        n_images = sum(c["images"] for c in per_split.values())
        if n_images == 0:
            raise EmptySelectionError(f"no image of the selection could be exported ({len(plan.skipped)} skipped): "
                                      "nothing written")
        card = target.scratch / "README.md"
        card.write_text(_card(split_names, per_split))
        files.append({"path": "README.md", "bytes": card.stat().st_size, "sha256": _sha256_file(card)})
        target.put("README.md", card)
        return {"files": files, "images": n_images, "masks": sum(c["masks"] for c in per_split.values()),
                "per_split": per_split, "skipped": plan.skipped, "skipped_masks": plan.skipped_masks}

    return _run_export("hf", out, overwrite, s3_endpoint_url, body, filters, splits, store, s3_region)


def _object(row: dict) -> dict:
    created = row.get("created_at")
    return {"mask_id": row["mask_id"],
            "segmentation": {"size": [int(row["height"]), int(row["width"])], "counts": _counts_str(row["rle"])},
            "bbox": [float(v) for v in row["bbox"]], "area": int(row["area"]),
            "predicted_iou": row.get("predicted_iou"), "stability_score": row.get("stability_score"),
            "category": row.get("prompt_text") or "object", "stage": row["stage"], "origin": row.get("origin"),
            "round": int(row["round"]), "model_version": row.get("model_version"), "annotator": row.get("annotator"),
            "verified": bool(row.get("verified")),
            "created_at": created if created is None or isinstance(created, str) else created.isoformat()}


def _card(split_names: list[str], per_split: dict) -> str:
    """The data set card: a YAML header naming each split's files (the Hub and `load_dataset` read it)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for name in split_names:
        if per_split[name]["files"]:
            lines += [f"  - split: {name}", f"    path: data/{name}-*"]
    lines += ["---", "", "# Masks exported by sa-engine", "",
              "One row per image: the image, and its masks as COCO RLE with their lineage (`objects`).", "",
              "| split | images | masks |", "|---|---|---|"]
    lines += [f"| {n} | {c['images']} | {c['masks']} |" for n, c in per_split.items() if c["files"]]
    return "\n".join(lines) + "\n"
