"""SA-1B and COCO exports of the mask store: filtered, split by a stable hash, streamed, atomic.

Two formats:
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

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
from PIL import Image

from storage.backend import LocalStore, StoreError, open_store, sha256_file
from storage.images import BadImage, ImageSource, decode_image
from storage.records import SCHEMA_VERSION, MaskRecord
from storage.rle import rle_problem
from storage.shards import MaskStore

log = logging.getLogger(__name__)

FORMATS = ("sa1b", "coco")
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

# ----------------------------------------------------------------------------------------------------------
# Filters and splits


@dataclass(frozen=True)
class ExportFilters:
    """Which masks to export. None/False means "no restriction"; all given conditions must hold.

    rounds: inclusive (lo, hi). min_predicted_iou / min_stability_score drop masks without a score
    (human masks) as the store's filters do; combine with `stage` to keep them.
    """

    stage: tuple[str, ...] | None = None
    rounds: tuple[int, int] | None = None
    verified_only: bool = False
    min_predicted_iou: float | None = None
    min_stability_score: float | None = None
    image_ids: frozenset[str] | None = None

    def store_kwargs(self) -> dict:
        """The same filters as keyword arguments of `MaskStore.iter_batches`."""
        kw: dict = {}
        if self.stage is not None:
            kw["stage"] = list(self.stage)
        if self.rounds is not None:
            kw["round"] = (int(self.rounds[0]), int(self.rounds[1]))
        if self.verified_only:
            kw["verified"] = True
        if self.min_predicted_iou is not None:
            kw["min_predicted_iou"] = float(self.min_predicted_iou)
        if self.min_stability_score is not None:
            kw["min_stability_score"] = float(self.min_stability_score)
        if self.image_ids is not None:
            kw["image_ids"] = sorted(self.image_ids)
        return kw

    def describe(self) -> str:
        """One line for messages, e.g. `stage=auto round=1..2 verified_only`."""
        parts = []
        if self.stage is not None:
            parts.append("stage=" + ",".join(self.stage))
        if self.rounds is not None:
            parts.append(f"round={self.rounds[0]}..{self.rounds[1]}")
        if self.verified_only:
            parts.append("verified_only")
        if self.min_predicted_iou is not None:
            parts.append(f"min_predicted_iou={self.min_predicted_iou}")
        if self.min_stability_score is not None:
            parts.append(f"min_stability_score={self.min_stability_score}")
        if self.image_ids is not None:
            parts.append(f"image_ids=<{len(self.image_ids)} ids>")
        return " ".join(parts) or "no filters"

    def to_json(self) -> dict:
        return {"stage": list(self.stage) if self.stage else None,
                "rounds": list(self.rounds) if self.rounds else None,
                "verified_only": self.verified_only, "min_predicted_iou": self.min_predicted_iou,
                "min_stability_score": self.min_stability_score,
                "image_ids": len(self.image_ids) if self.image_ids is not None else None}


def parse_splits(spec: str | None) -> dict[str, float]:
    """"train=0.9,val=0.1" -> {"train": 0.9, "val": 0.1}. None/"" -> {"all": 1.0}. Fractions must sum to 1."""
    if not spec:
        return dict(DEFAULT_SPLITS)
    splits: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, frac = part.strip().partition("=")
        if not sep or not name:
            raise ExportError(f"split {part.strip()!r}: expected NAME=FRACTION (e.g. train=0.9,val=0.1)")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ExportError(f"split {name!r}: names may use letters, digits, '-' and '_' only")
        try:
            value = float(frac)
        except ValueError:
            raise ExportError(f"split {name!r}: fraction {frac!r} is not a number") from None
        if not 0.0 < value <= 1.0 or name in splits:
            raise ExportError(f"split {name!r}: fraction must be in (0, 1] and each name given once")
        splits[name] = value
    if abs(sum(splits.values()) - 1.0) > 1e-6:
        raise ExportError(f"splits {spec!r}: fractions sum to {sum(splits.values()):g}, not 1")
    return splits


def parse_rounds(spec: str | None) -> tuple[int, int] | None:
    """"2" -> (2, 2); "1:3" -> (1, 3) (inclusive); None/"" -> None."""
    if not spec:
        return None
    lo, sep, hi = str(spec).partition(":")
    try:
        rounds = (int(lo), int(hi) if sep else int(lo))
    except ValueError:
        raise ExportError(f"rounds {spec!r}: expected a round (2) or an inclusive range (1:3)") from None
    if rounds[0] > rounds[1]:
        raise ExportError(f"rounds {spec!r}: the range is empty ({rounds[0]} > {rounds[1]})")
    return rounds


def read_image_ids(path: str | Path) -> frozenset[str]:
    """A file with one image id a line (blank lines and # comments ignored) -> the set of ids."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ExportError(f"{path}: cannot read the image id list ({e.strerror or e})") from None
    return frozenset(s for s in (line.split("#", 1)[0].strip() for line in lines) if s)


def image_hash_unit(image_id: str) -> float:
    """A stable pseudo-random number in [0, 1) from the image id (sha1; the same on every machine and run)."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:13], 16) / float(16 ** 13)


def assign_splits(image_ids: list[str], splits: dict[str, float]) -> np.ndarray:
    """(N,) int: index into `splits` (in its order) of each image, from the stable hash of its id.

    An image's split depends on its id and the fractions only, so adding images never moves old ones.
    """
    bounds = np.cumsum(list(splits.values()))
    bounds[-1] = 1.0 + 1e-9  # rounding never leaves an image without a split
    units = np.fromiter((image_hash_unit(i) for i in image_ids), dtype=np.float64, count=len(image_ids))
    return np.searchsorted(bounds, units, side="right").astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# The plan: one small row per selected image


@dataclass
class _Plan:
    """The selected images, sorted by image id. Arrays are (N,) aligned with `ids`."""

    ids: list[str]
    ids_sorted_bytes: np.ndarray  # (N,) 'S' dtype: utf-8 ids for vectorised lookups (searchsorted)
    height: np.ndarray  # int32
    width: np.ndarray  # int32
    n_masks: np.ndarray  # int64
    split: np.ndarray  # int32 index into split names
    number: np.ndarray  # int64: the image's numeric id in the export (1-based rank of its id)
    keep: np.ndarray  # bool: False for images left out (reason in `skipped`)
    skipped: list[dict] = field(default_factory=list)
    skipped_masks: list[dict] = field(default_factory=list)  # damaged rows left out: mask_id, shard, reason

    def lookup(self, image_ids: pa.Array) -> np.ndarray:
        """(M,) positions into the plan of `image_ids`; -1 where an id is not planned."""
        if len(self.ids) == 0:
            return np.full(len(image_ids), -1, np.int64)
        # utf-8 bytes (astype("S") encodes ASCII and failed on "café.jpg"); their order is the str order
        wanted = np.array([i.encode() for i in image_ids.to_pylist()], dtype="S")
        pos = np.searchsorted(self.ids_sorted_bytes, wanted)
        pos = np.minimum(pos, len(self.ids) - 1)
        found = self.ids_sorted_bytes[pos] == wanted
        return np.where(found, pos, -1)

    def damaged(self, store: "MaskStore", row: dict) -> bool:
        """True (and the row is set aside, with a one-line warning naming its shard and mask id) when the
        row's RLE cannot be its (height, width) mask: garbage or truncated counts, a wrong size."""
        problem = rle_problem(row["rle"], row["height"], row["width"])
        if problem is None:
            return False
        shard = store.locate(row["mask_id"], row["image_id"])
        entry = {"image_id": row["image_id"], "mask_id": row["mask_id"], "shard": shard, "reason": problem}
        self.skipped_masks.append(entry)
        log.warning("export: skipping mask %s of shard %s: %s", row["mask_id"], shard, problem)
        return True

    def skip(self, pos: int, reason: str) -> None:
        if self.keep[pos]:
            self.keep[pos] = False
            self.skipped.append({"image_id": self.ids[pos], "reason": reason})
            log.warning("export: skipping image %s: %s", self.ids[pos], reason)


def _aggregate(tables: list[pa.Table]) -> pa.Table:
    """Per-image (image_id, h_min, h_max, w_min, w_max, n) from partial aggregates."""
    t = pa.concat_tables(tables)
    out = t.group_by("image_id").aggregate(
        [("h_min", "min"), ("h_max", "max"), ("w_min", "min"), ("w_max", "max"), ("n", "sum")])
    return _rename(out, {"h_min_min": "h_min", "h_max_max": "h_max", "w_min_min": "w_min", "w_max_max": "w_max",
                         "n_sum": "n"})


def _rename(table: pa.Table, names: dict[str, str]) -> pa.Table:
    """Rename by name (pyarrow versions differ in where group_by puts the key column)."""
    return table.rename_columns([names.get(c, c) for c in table.column_names])


def build_plan(store: "MaskStore", filters: ExportFilters, splits: dict[str, float]) -> _Plan:
    """Read only (image_id, height, width) of the selected masks and plan the images.

    Images whose masks disagree on the image size are left out (skipped, with the reason).
    Memory: O(images), a few dozen bytes each; masks are not held.
    """
    partial: list[pa.Table] = []
    held = 0
    for batch in store.iter_batches(columns=["image_id", "height", "width"], **filters.store_kwargs()):
        if batch.num_rows == 0:
            continue
        t = pa.Table.from_batches([batch]).group_by("image_id").aggregate(
            [("height", "min"), ("height", "max"), ("width", "min"), ("width", "max"), ("image_id", "count")])
        t = _rename(t, {"height_min": "h_min", "height_max": "h_max", "width_min": "w_min", "width_max": "w_max",
                        "image_id_count": "n"})
        t = t.select(["image_id", "h_min", "h_max", "w_min", "w_max", "n"])
        t = t.set_column(5, "n", t["n"].cast(pa.int64()))
        partial.append(t)
        held += t.num_rows
        if len(partial) >= 64:  # fold partial aggregates so they never outgrow the image count
            partial = [_aggregate(partial)]
    per_image = _aggregate(partial) if partial else None
    if per_image is None or per_image.num_rows == 0:
        raise EmptySelectionError(f"the filters select no masks ({filters.describe()}): nothing written")
    per_image = per_image.sort_by("image_id")
    ids = per_image["image_id"].to_pylist()
    n = len(ids)
    plan = _Plan(
        ids=ids,
        ids_sorted_bytes=np.array([i.encode() for i in ids], dtype="S"),
        height=per_image["h_max"].to_numpy().astype(np.int32),
        width=per_image["w_max"].to_numpy().astype(np.int32),
        n_masks=per_image["n"].to_numpy().astype(np.int64),
        split=assign_splits(ids, splits),
        number=np.arange(1, n + 1, dtype=np.int64),
        keep=np.ones(n, bool),
    )
    h_min, w_min = per_image["h_min"].to_numpy(), per_image["w_min"].to_numpy()
    for pos in np.flatnonzero((h_min != plan.height) | (w_min != plan.width)):
        plan.skip(int(pos), f"its masks disagree on the image size ({int(h_min[pos])}x{int(w_min[pos])} vs "
                            f"{int(plan.height[pos])}x{int(plan.width[pos])})")
    return plan


# ----------------------------------------------------------------------------------------------------------
# Output targets: staged, then published atomically (local) or index-last (S3)


def _is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


class _Target(ABC):
    """Where an export goes: `check` (refuse an existing output), `begin`, `put` files, `publish` the index.

    Files are produced in `scratch` (a local folder) and handed over with `put(rel, local_path)`.
    """

    scratch: Path

    @abstractmethod
    def check(self, overwrite: bool) -> None:
        ...

    @abstractmethod
    def begin(self, marker: dict) -> None:
        ...

    @abstractmethod
    def put(self, rel: str, local_path: Path) -> None:
        ...

    @abstractmethod
    def publish(self, index: dict) -> None:
        ...

    @abstractmethod
    def abort(self) -> None:
        ...


class _LocalTarget(_Target):
    """A local folder. Everything is written into a sibling staging folder, then swapped in by rename."""

    def __init__(self, out: str):
        self.out = Path(out).resolve()
        self.staging = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.scratch = self.staging / ".scratch"

    def check(self, overwrite: bool) -> None:
        if not self.out.exists():
            return
        if self.out.is_dir() and not any(self.out.iterdir()):
            return
        if not overwrite:
            raise OutputExistsError(f"{self.out}: output exists; pass --overwrite to replace it")
        if not (self.out.is_dir() and (self.out / MARKER_NAME).exists()):
            raise OutputExistsError(f"{self.out}: exists and is not an sa-engine export; not replacing it")

    def begin(self, marker: dict) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True)
        (self.staging / MARKER_NAME).write_text(json.dumps(marker))

    def put(self, rel: str, local_path: Path) -> None:
        dest = self.staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, dest)

    def publish(self, index: dict) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        tmp = self.staging / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.staging / INDEX_NAME)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class _S3Target(_Target):
    """An s3:// prefix, through storage.backend. The old index goes first, stale objects next, the new index last."""

    def __init__(self, out: str, s3_endpoint_url: str | None):

        self.uri = out.rstrip("/")
        self.store = open_store(self.uri, s3_endpoint_url=s3_endpoint_url)
        self.scratch = Path(tempfile.mkdtemp(prefix="sa-export-"))
        self.written: set[str] = set()
        self.old_keys: list[str] = []

    def check(self, overwrite: bool) -> None:
        existing = self.store.list("")  # hidden keys (our marker) are not listed
        ours = self.store.exists(MARKER_NAME)
        if not existing and not ours:
            return
        if not overwrite:
            raise OutputExistsError(f"{self.uri}: output exists; pass --overwrite to replace it")
        if not ours:
            raise OutputExistsError(f"{self.uri}: exists and is not an sa-engine export; not replacing it")
        self.old_keys = existing

    def begin(self, marker: dict) -> None:
        # From here on the old export is no longer complete: readers see no index until ours is written.
        self.store.delete(INDEX_NAME)
        self.store.write_bytes(MARKER_NAME, json.dumps(marker).encode())
        self.written.add(MARKER_NAME)

    def put(self, rel: str, local_path: Path) -> None:
        self.store.write_file(rel, local_path)  # multipart when large: the tar is never held in memory
        self.written.add(rel)
        Path(local_path).unlink()

    def publish(self, index: dict) -> None:
        for key in self.old_keys:
            if key not in self.written and key != INDEX_NAME:
                self.store.delete(key)
        self.store.write_bytes(INDEX_NAME, json.dumps(index, indent=1).encode())
        shutil.rmtree(self.scratch, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def collect_export_garbage(out: str, min_age_s: float = 3600.0) -> list[str]:
    """Delete what killed exports to the local folder `out` left: its staging and old-copy siblings
    (".<name>.tmp-*", ".<name>.old-*") and this machine's S3 export scratch folders (sa-export-* in the
    temp dir), older than `min_age_s`. Returns the deleted paths."""
    now, deleted = time.time(), []
    candidates = list(Path(tempfile.gettempdir()).glob("sa-export-*"))
    if not _is_s3(out):
        target = Path(out).resolve()
        candidates += list(target.parent.glob(f".{target.name}.tmp-*")) + list(target.parent.glob(f".{target.name}.old-*"))
    for path in candidates:
        try:
            if path.is_dir() and now - path.stat().st_mtime >= min_age_s:
                shutil.rmtree(path, ignore_errors=True)
                deleted.append(str(path))
        except OSError:
            continue
    return deleted


def _open_target(out: str, s3_endpoint_url: str | None) -> _Target:
    return _S3Target(out, s3_endpoint_url) if _is_s3(out) else _LocalTarget(out)


def _sha256_file(path: Path) -> str:
    return sha256_file(path)


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


# ----------------------------------------------------------------------------------------------------------
# The exports


def _split_prefix(split: str, splits: dict[str, float]) -> str:
    """Tars of a single-split export sit at the top (SA-1B's flat layout); with several, one folder each."""
    return "" if len(splits) == 1 else f"{split}/"


def _marker(fmt: str, filters: ExportFilters, splits: dict[str, float]) -> dict:
    return {"format": fmt, "started_at": datetime.now(timezone.utc).isoformat(), "filters": filters.to_json(),
            "splits": splits}


def _run_export(fmt: str, out: str, overwrite: bool, s3_endpoint_url: str | None,
                body: Callable[[_Target, _Plan], dict], filters: ExportFilters, splits: dict[str, float],
                store: "MaskStore") -> dict:
    """Shared frame: refuse an existing output, verify the store, plan, run `body`, publish the index last.

    Everything that can refuse the export (existing output, corrupt shard, empty selection) is decided
    before the first write, so a refused export leaves the old output untouched, on S3 too.
    """
    target = _open_target(out, s3_endpoint_url)
    target.check(overwrite)
    started = time.perf_counter()
    store.verify()  # a shard failing its checksum stops the export before anything is written
    plan = build_plan(store, filters, splits)  # raises EmptySelectionError
    try:
        target.begin(_marker(fmt, filters, splits))
        index = body(target, plan)
        index.update({"format": fmt, "schema_version": SCHEMA_VERSION,
                      "created_at": datetime.now(timezone.utc).isoformat(),
                      "filters": filters.to_json(), "splits": splits})
        target.publish(index)
    except BaseException:
        target.abort()
        raise
    seconds = time.perf_counter() - started
    summary = {k: v for k, v in index.items() if k != "files"}
    summary.update({"out": out, "files": len(index["files"]), "seconds": round(seconds, 3),
                    "images_per_s": index["images"] / max(seconds, 1e-9),
                    "masks_per_s": index["masks"] / max(seconds, 1e-9)})
    return summary


def export_sa1b(store: "MaskStore", out: str, images: "ImageSource", filters: ExportFilters = ExportFilters(),
                splits: dict[str, float] | None = None, images_per_tar: int = 1000, overwrite: bool = False,
                s3_endpoint_url: str | None = None, spool_buffer_mb: float = 32.0) -> dict:
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
        # Tar number of each image: images of one split in id order, N per tar; tars numbered per split.
        tar_of = np.full(len(plan.ids), -1, np.int64)
        tars: list[tuple[int, int]] = []  # global tar index -> (split index, tar number within split)
        for s in range(len(split_names)):
            members = np.flatnonzero(plan.split == s)
            for k in range(0, len(members), images_per_tar):
                tar_of[members[k:k + images_per_tar]] = len(tars)
                tars.append((s, k // images_per_tar))
        spool = _Spool(target.scratch / "spool", int(spool_buffer_mb * 2 ** 20))
        for batch in store.iter_batches(columns=_SA1B_COLUMNS, **filters.store_kwargs()):
            pos = plan.lookup(batch.column("image_id"))
            ok = pos >= 0
            if not ok.all():
                batch, pos = batch.filter(pa.array(ok)), pos[ok]
            spool.add(batch, tar_of[pos])
        spool.flush()

        files, ann_id, n_images, n_masks = [], 0, 0, 0
        mtime = time.time()
        per_split = {name: {"images": 0, "masks": 0, "tars": 0} for name in split_names}
        for t, (s, k) in enumerate(tars):
            table = spool.read(t)
            if table is None:
                continue
            tar_path = target.scratch / f"tar-{t}.tar"
            images_in_tar = masks_in_tar = 0
            with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
                for p, group in _image_groups(table, plan):
                    if not plan.keep[p]:
                        continue
                    number, h, w = int(plan.number[p]), int(plan.height[p]), int(plan.width[p])
                    try:
                        data, ext = source.file(plan.ids[p], h, w)
                    except ExportError as e:
                        plan.skip(int(p), str(e))
                        continue
                    anns = []
                    for row in group:
                        if plan.damaged(store, row):
                            continue
                        ann_id += 1
                        anns.append(sa1b_annotation(row, ann_id))
                    if not anns:
                        plan.skip(int(p), "every mask of it is damaged (see skipped_masks)")
                        continue
                    doc = {"image": {"image_id": number, "width": w, "height": h, "file_name": f"sa_{number}.{ext}",
                                     LINEAGE_KEY: {"image_id": plan.ids[p], "split": split_names[s]}},
                           "annotations": anns}
                    _tar_add(tar, f"sa_{number}.{ext}", data, mtime)
                    _tar_add(tar, f"sa_{number}.json", json.dumps(doc).encode(), mtime)
                    images_in_tar += 1
                    masks_in_tar += len(anns)
            spool.drop(t)
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

    return _run_export("sa1b", out, overwrite, s3_endpoint_url, body, filters, splits, store)


def export_coco(store: "MaskStore", out: str, filters: ExportFilters = ExportFilters(),
                splits: dict[str, float] | None = None, overwrite: bool = False,
                s3_endpoint_url: str | None = None) -> dict:
    """Export the selected masks as one COCO instances JSON per split: `instances_<split>.json` under `out`.

    Image ids are the images' numeric ids in this export (1-based rank of the image id); each image
    and annotation carries our ids under "sa_engine". `file_name` is our image id, which is the
    image's key relative to the image source (images.source). Annotations stream to a local file;
    the JSON is then assembled by copying.
    """
    splits = dict(splits or DEFAULT_SPLITS)
    split_names = list(splits)

    def body(target: _Target, plan: _Plan) -> dict:
        parts = [_JsonArrayFile(target.scratch / f"{name}.annotations.part") for name in split_names]
        counts = {name: {"images": 0, "masks": 0} for name in split_names}
        ann_id = 0
        phrases: dict[str, int] = {}  # concept phrase -> category id (2, 3, … in order of first appearance)
        damaged = np.zeros(len(plan.ids), np.int64)
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
                parts[plan.split[p]].write(coco_annotation(row, ann_id, int(plan.number[p]), category))
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
        return {"files": files, "images": n_images, "masks": ann_id, "per_split": counts, "skipped": plan.skipped,
                "skipped_masks": plan.skipped_masks}

    return _run_export("coco", out, overwrite, s3_endpoint_url, body, filters, splits, store)


def export(fmt: str, store: "MaskStore", out: str, images: "ImageSource | None" = None, **kw) -> dict:
    """Dispatch on the format name ("sa1b" or "coco")."""
    if fmt == "sa1b":
        if images is None:
            raise ExportError("sa1b export: needs the image source (the images go into the tars)")
        return export_sa1b(store, out, images, **kw)
    if fmt == "coco":
        kw.pop("images_per_tar", None)
        return export_coco(store, out, **kw)
    raise ExportError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------------------------------
# Spooling (SA-1B) and streamed JSON arrays (COCO)


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


# ----------------------------------------------------------------------------------------------------------
# Reading exports back


def _export_store(out: str, s3_endpoint_url: str | None):

    return open_store(str(out).rstrip("/"), s3_endpoint_url=s3_endpoint_url)


def read_index(out: str, s3_endpoint_url: str | None = None) -> dict:
    """The index of a finished export; raises CorruptExportError when there is none (incomplete export)."""
    store = _export_store(out, s3_endpoint_url)
    if not store.exists(INDEX_NAME):
        raise CorruptExportError(f"{out}: no {INDEX_NAME}: not an export, or an incomplete one")
    return json.loads(store.read_bytes(INDEX_NAME))


def open_export_file(out: str, entry: dict, s3_endpoint_url: str | None = None, verify: bool = True) -> BinaryIO:
    """A binary file of one file listed in an export's index, checked against its sha256 first.

    Streams in 1 MiB chunks (a local file is hashed in place; an S3 object is copied to a temporary
    file while hashed), so memory stays flat however large the file. Raises CorruptExportError naming it.
    """
    store = _export_store(out, s3_endpoint_url)
    rel = entry["path"]
    where = store.url(rel)
    try:
        if isinstance(store, LocalStore):
            if verify and _sha256_file(Path(where)) != entry["sha256"]:
                raise CorruptExportError(f"{where}: checksum mismatch (sha256 differs from the index)")
            return open(where, "rb")
        tmp = tempfile.TemporaryFile()
        h = hashlib.sha256()
        with store.open_read(rel) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                tmp.write(chunk)
        tmp.seek(0)
        if verify and h.hexdigest() != entry["sha256"]:
            tmp.close()
            raise CorruptExportError(f"{where}: checksum mismatch (sha256 differs from the index)")
        return tmp
    except (StoreError, OSError) as e:
        raise CorruptExportError(f"{where}: listed in the index but unreadable ({e})".replace("\n", " ")) from None


def iter_sa1b_tar(fileobj: BinaryIO) -> Iterator[tuple[dict, str, bytes]]:
    """Yield (image JSON, image file name, image bytes) for each image of one SA-1B tar, streaming.

    Works on any SA-1B tar (Meta's or ours): members are paired by their stem (`sa_1.jpg` + `sa_1.json`).
    """
    pending: dict[str, dict] = {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            stem, _, ext = name.rpartition(".")
            data = tar.extractfile(member).read()
            slot = pending.setdefault(stem, {})
            if ext == "json":
                slot["json"] = json.loads(data)
            else:
                slot["image"] = (name, data)
            if "json" in slot and "image" in slot:
                del pending[stem]
                yield slot["json"], slot["image"][0], slot["image"][1]
    for stem, slot in pending.items():
        if "json" in slot:  # a JSON without its image (e.g. images stripped): still yield the masks
            yield slot["json"], slot["json"]["image"].get("file_name", stem), b""
