"""What an export takes: filters, splits and the plan (one small row per selected image)."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.exports.common import (
    DEFAULT_SPLITS,
    EmptySelectionError,
    ExportError,
)
from storage.rle import rle_problem
from storage.shards import MaskStore

log = logging.getLogger("storage.exports")

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
