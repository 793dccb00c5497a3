"""The SA-1B export: JSON per image beside the image, in tar shards, spooled per tar."""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from PIL import Image

from storage.backend import StoreError
from storage.exports.common import (
    _SA1B_COLUMNS,
    DEFAULT_SPLITS,
    LINEAGE_KEY,
    EmptySelectionError,
    ExportError,
    _sha256_file,
)
from storage.exports.plan import (
    ExportFilters,
    _Plan,
)
from storage.exports.rows import (
    _image_groups,
    sa1b_annotation,
)
from storage.exports.targets import (
    _run_export,
    _split_prefix,
    _Target,
)
from storage.images import BadImage, ImageSource, decode_image
from storage.shards import MaskStore

log = logging.getLogger("storage.exports")

# ----------------------------------------------------------------------------------------------------------
# Images for SA-1B tars


class _Images:
    """The image files beside the JSONs: the original bytes when they are what the masks were drawn on
    (same size, 8-bit RGB or grey, JPEG or PNG, no EXIF rotation), else the decoded full-resolution
    pixels (EXIF applied, 8-bit RGB, as ImageSource decodes them) re-encoded as PNG, losslessly."""

    def __init__(self, source: "ImageSource"):
        self.source = source

    def file(self, image_id: str, height: int, width: int) -> tuple[bytes, str]:
        """-> (file bytes, extension). Raises ExportError (one line) when the image can't be had."""

        ref = self.source.ref(image_id)  # the id is the key: no listing of the whole source
        try:
            raw = self.source.store.read_bytes(ref.key)
            with Image.open(io.BytesIO(raw)) as im:
                fmt, size, mode = im.format, im.size, im.mode
                orientation = im.getexif().get(0x0112, 1)
            if fmt in ("JPEG", "PNG") and size == (width, height) and mode in ("RGB", "L") and orientation == 1:
                return raw, "jpg" if fmt == "JPEG" else "png"
            pixels = decode_image(raw, ref.uri)
        except (BadImage, StoreError) as e:
            raise ExportError(str(e)) from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL could not read the header
            raise ExportError(f"{ref.uri}: unreadable image ({type(e).__name__}: {e})".replace("\n", " ")) from None
        if pixels.shape[:2] != (height, width):
            raise ExportError(f"{ref.uri}: image is {pixels.shape[0]}x{pixels.shape[1]} but its masks are "
                              f"{height}x{width}")
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "png"


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))



def export_sa1b(store: "MaskStore", out: str, images: "ImageSource", filters: ExportFilters = ExportFilters(),
                splits: dict[str, float] | None = None, images_per_tar: int = 1000, overwrite: bool = False,
                s3_endpoint_url: str | None = None, spool_buffer_mb: float = 32.0,
                s3_region: str | None = None) -> dict:
    """Export the selected masks as SA-1B tar shards under `out` (a folder or s3:// prefix).

    Tar k of a split holds images k*N .. (k+1)*N-1 of that split in image-id order, each as
    `sa_<n>.<jpg|png>` and `sa_<n>.json` (n: the image's numeric id in this export). Returns a summary
    (images, masks, skipped, per-split counts, images_per_s, masks_per_s). Raises OutputExistsError,
    EmptySelectionError, or the store's CorruptShardError naming the shard.
    """
    splits = dict(splits or DEFAULT_SPLITS)
    if images_per_tar < 1:
        raise ExportError(f"images_per_tar={images_per_tar}: must be at least 1")
    split_names = list(splits)

    def body(target: _Target, plan: _Plan) -> dict:
        source = _Images(images)
        _, groups = image_buckets(store, plan, filters, target, len(split_names), images_per_tar, spool_buffer_mb)
        files, ann_id, n_images, n_masks = [], 0, 0, 0
        mtime = time.time()
        per_split = {name: {"images": 0, "masks": 0, "tars": 0} for name in split_names}
        for t, (s, k), image_groups in groups:
            tar_path = target.scratch / f"tar-{t}.tar"
            images_in_tar = masks_in_tar = 0
            with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
                for im in exportable(image_groups, plan, store, source):
                    p, number, h, w, data, ext = im.p, im.number, im.height, im.width, im.data, im.ext
                    anns = [sa1b_annotation(row, ann_id + k + 1) for k, row in enumerate(im.rows)]
                    ann_id += len(anns)
                    doc = {"image": {"image_id": number, "width": w, "height": h, "file_name": f"sa_{number}.{ext}",
                                     LINEAGE_KEY: {"image_id": plan.ids[p], "split": split_names[s]}},
                           "annotations": anns}
                    _tar_add(tar, f"sa_{number}.{ext}", data, mtime)
                    _tar_add(tar, f"sa_{number}.json", json.dumps(doc).encode(), mtime)
                    images_in_tar += 1
                    masks_in_tar += len(anns)
            if images_in_tar == 0:
                tar_path.unlink()
                continue
            rel = f"{_split_prefix(split_names[s], splits)}sa_{k:06d}.tar"
            files.append({"path": rel, "split": split_names[s], "images": images_in_tar, "masks": masks_in_tar,
                          "bytes": tar_path.stat().st_size, "sha256": _sha256_file(tar_path)})
            target.put(rel, tar_path)
            per_split[split_names[s]]["images"] += images_in_tar
            per_split[split_names[s]]["masks"] += masks_in_tar
            per_split[split_names[s]]["tars"] += 1
            n_images += images_in_tar
            n_masks += masks_in_tar
        if n_images == 0:
            raise EmptySelectionError(f"no image of the selection could be exported "
                                      f"({len(plan.skipped)} skipped, first: {plan.skipped[0]['image_id']}: "
                                      f"{plan.skipped[0]['reason']}): nothing written")
        return {"files": files, "images": n_images, "masks": n_masks, "per_split": per_split,
                "skipped": plan.skipped, "skipped_masks": plan.skipped_masks, "images_per_tar": images_per_tar}

    return _run_export("sa1b", out, overwrite, s3_endpoint_url, body, filters, splits, store, s3_region)



def image_buckets(store: "MaskStore", plan: _Plan, filters: ExportFilters, target: _Target, n_splits: int,
                  images_per_bucket: int, spool_buffer_mb: float, columns: list[str] = _SA1B_COLUMNS):
    """Every kept image with all its rows, bucket by bucket, in bounded memory: bucket k of a split holds its
    images k*N .. (k+1)*N-1 in image-id order (N = images_per_bucket). Rows are spooled to local Arrow files, one
    folder per bucket, so each bucket is then read alone. Returns (buckets: [(split index, bucket number in
    split)], an iterator of (bucket index, (split, number), iterator of (plan position, rows of the image)))."""
    bucket_of = np.full(len(plan.ids), -1, np.int64)
    buckets: list[tuple[int, int]] = []
    for s in range(n_splits):
        members = np.flatnonzero(plan.split == s)
        for k in range(0, len(members), images_per_bucket):
            bucket_of[members[k:k + images_per_bucket]] = len(buckets)
            buckets.append((s, k // images_per_bucket))
    spool = _Spool(target.scratch / "spool", int(spool_buffer_mb * 2 ** 20))
    for batch in store.iter_batches(columns=columns, **filters.store_kwargs()):
        pos = plan.lookup(batch.column("image_id"))
        ok = pos >= 0
        if not ok.all():
            batch, pos = batch.filter(pa.array(ok)), pos[ok]
        spool.add(batch, bucket_of[pos])
    spool.flush()

    def groups():
        for t, where in enumerate(buckets):
            table = spool.read(t)
            if table is None:
                continue
            yield t, where, ((p, rows) for p, rows in _image_groups(table, plan) if plan.keep[p])
            spool.drop(t)

    return buckets, groups()


@dataclass
class ExportImage:
    """One image of a bucket, ready to write: its plan position and number, its size, its file (bytes and
    extension, as `_Images.file` gives them) and its undamaged rows."""

    p: int
    number: int
    height: int
    width: int
    data: bytes
    ext: str
    rows: list


def exportable(image_groups, plan: _Plan, store: "MaskStore", source: _Images) -> Iterator[ExportImage]:
    """The images of a bucket that can be written: an image whose file can't be had, or whose every mask is
    damaged, is skipped with the reason (the plan's `skipped`)."""
    for p, rows in image_groups:
        number, h, w = int(plan.number[p]), int(plan.height[p]), int(plan.width[p])
        rows = [r for r in rows if not plan.damaged(store, r)]
        try:
            data, ext = source.file(plan.ids[p], h, w)
        except ExportError as e:
            plan.skip(int(p), str(e))
            continue
        if not rows:
            plan.skip(int(p), "every mask of it is damaged (see skipped_masks)")
            continue
        yield ExportImage(int(p), number, h, w, data, ext, rows)


# ----------------------------------------------------------------------------------------------------------
# Spooling


class _Spool:
    """Rows bucketed by output tar on local disk: Arrow IPC files `<dir>/<tar>/<seq>.arrow`.

    Rows are buffered in memory up to `buffer_bytes`, then every bucket is flushed to one file.
    """

    def __init__(self, root: Path, buffer_bytes: int):
        self.root = root
        self.buffer_bytes = buffer_bytes
        self.buffers: dict[int, list[pa.RecordBatch]] = {}
        self.held = 0
        self.seq = 0
        root.mkdir(parents=True, exist_ok=True)

    def add(self, batch: pa.RecordBatch, bucket: np.ndarray) -> None:
        """batch: store rows; bucket: (rows,) int tar index of each row."""
        if batch.num_rows == 0:
            return
        order = np.argsort(bucket, kind="stable")
        sorted_bucket = bucket[order]
        cuts = np.flatnonzero(np.diff(sorted_bucket)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(order)]])
        taken = batch.take(pa.array(order))
        for a, b in zip(starts.tolist(), ends.tolist()):
            piece = taken.slice(a, b - a)
            self.buffers.setdefault(int(sorted_bucket[a]), []).append(piece)
        self.held += taken.nbytes
        if self.held >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for bucket, pieces in self.buffers.items():
            folder = self.root / str(bucket)
            folder.mkdir(exist_ok=True)
            table = pa.Table.from_batches(pieces)
            with ipc.new_file(folder / f"{self.seq:06d}.arrow", table.schema) as w:
                w.write_table(table)
            self.seq += 1
        self.buffers.clear()
        self.held = 0

    def read(self, bucket: int) -> pa.Table | None:
        folder = self.root / str(bucket)
        if not folder.exists():
            return None
        tables = []
        for path in sorted(folder.iterdir()):
            with ipc.open_file(path) as r:
                tables.append(r.read_all())
        return pa.concat_tables(tables) if tables else None

    def drop(self, bucket: int) -> None:
        shutil.rmtree(self.root / str(bucket), ignore_errors=True)
