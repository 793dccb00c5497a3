"""The WebDataset export: tar shards of bounded size, one sample per image, for streaming to trainers.

    <split>/shard-000000.tar, shard-000001.tar, ...   (no split folder with the default single split)
        <n>.<jpg|png>   the image (as the SA-1B export writes it: the original file when it is what the masks
                        were drawn on, else a lossless PNG)
        <n>.json        {"image": {...}, "annotations": [...]}: the SA-1B export's JSON (COCO RLE, bbox, scores,
                        lineage under "sa_engine")

A shard closes before it would pass `shard_mb` (a single larger sample gets a shard of its own) or
`images_per_shard` images. `webdataset.WebDataset(urls)` reads the shards from disk, over HTTP, or from S3
through a `pipe:` URL (docs/exports.md).
"""
from __future__ import annotations

import json
import tarfile
import time

from storage.exports.common import DEFAULT_SPLITS, LINEAGE_KEY, EmptySelectionError, ExportError, _sha256_file
from storage.exports.plan import ExportFilters, _Plan
from storage.exports.rows import sa1b_annotation
from storage.exports.sa1b import _Images, _tar_add, exportable, image_buckets
from storage.exports.targets import _run_export, _split_prefix, _Target
from storage.images import ImageSource
from storage.shards import MaskStore


def export_webdataset(store: MaskStore, out: str, images: ImageSource, filters: ExportFilters = ExportFilters(),
                      splits: dict[str, float] | None = None, overwrite: bool = False,
                      s3_endpoint_url: str | None = None, s3_region: str | None = None, shard_mb: float = 256.0,
                      images_per_shard: int = 1000, spool_buffer_mb: float = 32.0) -> dict:
    """Export the selected masks as WebDataset tar shards under `out` (a folder or s3:// prefix)."""
    splits = dict(splits or DEFAULT_SPLITS)
    if shard_mb <= 0 or images_per_shard < 1:
        raise ExportError(f"shard_mb={shard_mb}, images_per_shard={images_per_shard}: must be positive")
    split_names = list(splits)
    limit = int(shard_mb * 2 ** 20)

    def body(target: _Target, plan: _Plan) -> dict:
        source = _Images(images)
        _, groups = image_buckets(store, plan, filters, target, len(split_names), images_per_shard, spool_buffer_mb)
        shards = _ShardWriter(target, limit, images_per_shard)
        per_split = {name: {"images": 0, "masks": 0, "shards": 0} for name in split_names}
        ann_id = 0
        for _t, (s, _k), image_groups in groups:
            split = split_names[s]
            for im in exportable(image_groups, plan, store, source):
                p, number, h, w, data, ext = im.p, im.number, im.height, im.width, im.data, im.ext
                anns = [sa1b_annotation(row, ann_id + k + 1) for k, row in enumerate(im.rows)]
                ann_id += len(anns)
                doc = {"image": {"image_id": number, "width": w, "height": h, "file_name": f"{number:08d}.{ext}",
                                 LINEAGE_KEY: {"image_id": plan.ids[p], "split": split}}, "annotations": anns}
                shards.add(_split_prefix(split, splits), split, f"{number:08d}", ext, data,
                           json.dumps(doc).encode(), len(anns))
                per_split[split]["images"] += 1
                per_split[split]["masks"] += len(anns)
        files = shards.close()
        for f in files:
            per_split[f["split"]]["shards"] += 1
        n_images = sum(c["images"] for c in per_split.values())
        if n_images == 0:
            raise EmptySelectionError(f"no image of the selection could be exported ({len(plan.skipped)} skipped): "
                                      "nothing written")
        return {"files": files, "images": n_images, "masks": ann_id, "per_split": per_split,
                "shard_mb": shard_mb, "images_per_shard": images_per_shard, "skipped": plan.skipped,
                "skipped_masks": plan.skipped_masks}

    return _run_export("webdataset", out, overwrite, s3_endpoint_url, body, filters, splits, store, s3_region)


class _ShardWriter:
    """Tar shards per split prefix, each closed before it would pass the byte or image limit."""

    def __init__(self, target: _Target, limit_bytes: int, images_per_shard: int):
        self.target, self.limit, self.per_shard = target, limit_bytes, images_per_shard
        self.open: dict[str, dict] = {}  # prefix -> {tar, path, bytes, images, masks, number, split}
        self.numbers: dict[str, int] = {}
        self.files: list[dict] = []
        self.mtime = time.time()

    def add(self, prefix: str, split: str, key: str, ext: str, image: bytes, doc: bytes, masks: int) -> None:
        size = len(image) + len(doc) + 3 * 512  # two headers and padding, roughly
        cur = self.open.get(prefix)
        if cur is not None and (cur["images"] >= self.per_shard or (cur["images"] and cur["bytes"] + size > self.limit)):
            self._finish(prefix)
            cur = None
        if cur is None:
            number = self.numbers.get(prefix, 0)
            self.numbers[prefix] = number + 1
            path = self.target.scratch / f"wds-{abs(hash(prefix))}-{number}.tar"
            cur = self.open[prefix] = {"tar": tarfile.open(path, "w", format=tarfile.PAX_FORMAT), "path": path,
                                       "bytes": 0, "images": 0, "masks": 0, "number": number, "split": split}
        _tar_add(cur["tar"], f"{key}.{ext}", image, self.mtime)
        _tar_add(cur["tar"], f"{key}.json", doc, self.mtime)
        cur["bytes"] += size
        cur["images"] += 1
        cur["masks"] += masks

    def _finish(self, prefix: str) -> None:
        cur = self.open.pop(prefix)
        cur["tar"].close()
        rel = f"{prefix}shard-{cur['number']:06d}.tar"
        self.files.append({"path": rel, "split": cur["split"], "images": cur["images"], "masks": cur["masks"],
                           "bytes": cur["path"].stat().st_size, "sha256": _sha256_file(cur["path"])})
        self.target.put(rel, cur["path"])

    def close(self) -> list[dict]:
        for prefix in list(self.open):
            self._finish(prefix)
        return self.files
