"""Training input: PyTorch `IterableDataset`s over the shard store and over SA-1B tars.

Both split their work among all readers — Ray Train / torch.distributed ranks times DataLoader
workers — so that every mask is read exactly once per epoch:

- The units of work are files (store shards, SA-1B tars), listed in a fixed order. With at least as
  many units as readers, reader r takes units r, r + R, r + 2R, …; with fewer, the readers that share a
  unit take its items (rows or images) round-robin. Either way the shares are disjoint and cover all.
- Masks are decoded lazily: a sample's RLE is decoded only when that sample is yielded.

Rank and world size come from the arguments, else torch.distributed (Ray Train's TorchTrainer sets up
its process group), else the RANK / WORLD_SIZE environment variables, else (0, 1); they are looked up
in the rank's own process (at iteration, or when DataLoader pickles the dataset for its workers), so a
dataset built in a driver and shipped to the workers still splits by the workers' ranks. Ranks may get
unequal numbers of samples; a DDP loop that needs equal steps per rank should cap its steps.

Samples are dicts (use `batch_size=None` or `collate_samples` in the DataLoader; masks differ in size):
- per mask: image_id, mask_id, mask (H, W) bool tensor (or `rle` when decode=False), bbox (4,) XYWH px,
  area, predicted_iou / stability_score (nan for human masks), point_coords (K, 2) XY px, stage, round,
  verified;
- per image: image_id, masks (N, H, W) bool (or `rles`), bboxes (N, 4), mask_ids, …, and `image`
  (H, W, 3) uint8 when images are available.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage import exports
from storage.backend import StoreError
from storage.images import BadImage, ImageSource, decode_image
from storage.rle import decode_rles
from storage.shards import MaskStore, ShardInfo

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Who reads what


def detect_rank() -> tuple[int, int] | None:
    """(rank, world size) from torch.distributed, else from RANK / WORLD_SIZE; None when neither says."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def reader_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(this reader's index, number of readers) over ranks x DataLoader workers."""
    if rank is None or world_size is None:
        rank, world_size = detect_rank() or (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


@dataclass(frozen=True)
class Share:
    """One unit of work for one reader: items i of the unit with i % of == part."""

    unit: int
    part: int = 0
    of: int = 1

    def takes(self, item: int) -> bool:
        return item % self.of == self.part


def shares_for(reader: int, readers: int, units: int) -> list[Share]:
    """The units (and parts of units) reader `reader` of `readers` reads; disjoint and complete over readers."""
    if units == 0:
        return []
    if units >= readers:
        return [Share(u) for u in range(reader, units, readers)]
    unit = reader % units
    sharers = len(range(unit, readers, units))
    return [Share(unit, reader // units, sharers)]


# ----------------------------------------------------------------------------------------------------------
# Sample building


def _nan_if_none(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _mask_sample(row: dict, decode: bool) -> dict:
    """One store row (or SA-1B annotation normalised to a row) -> a per-mask sample."""
    rle = {"size": [int(row["height"]), int(row["width"])], "counts": row["rle"]}
    sample = {
        "image_id": row["image_id"],
        "mask_id": row["mask_id"],
        "bbox": torch.tensor(row["bbox"], dtype=torch.float32),
        "area": int(row["area"]),
        "predicted_iou": _nan_if_none(row.get("predicted_iou")),
        "stability_score": _nan_if_none(row.get("stability_score")),
        "point_coords": torch.tensor(row.get("point_coords") or [], dtype=torch.float32).reshape(-1, 2),
        "stage": row.get("stage"),
        "round": row.get("round"),
        "verified": bool(row.get("verified")),
    }
    if decode:
        sample["mask"] = torch.from_numpy(decode_rles([rle])[0])
    else:
        sample["rle"] = rle
    return sample


def _image_sample(image_id: str, size: tuple[int, int], rows: list[dict], decode: bool,
                  image: np.ndarray | None) -> dict:
    """All rows of one image (size (H, W)) -> a per-image sample (masks stacked)."""
    h, w = size
    rles = [{"size": [int(r["height"]), int(r["width"])], "counts": r["rle"]} for r in rows]
    sample = {
        "image_id": image_id,
        "mask_ids": [r["mask_id"] for r in rows],
        "size": (h, w),
        "bboxes": torch.tensor([r["bbox"] for r in rows], dtype=torch.float32).reshape(-1, 4),
        "areas": torch.tensor([int(r["area"]) for r in rows], dtype=torch.int64),
        "predicted_iou": torch.tensor([_nan_if_none(r.get("predicted_iou")) for r in rows]),
        "stability_score": torch.tensor([_nan_if_none(r.get("stability_score")) for r in rows]),
        "point_coords": [torch.tensor(r.get("point_coords") or [], dtype=torch.float32).reshape(-1, 2)
                         for r in rows],
        "stages": [r.get("stage") for r in rows],
        "origins": [r.get("origin") for r in rows],
        "verified": torch.tensor([bool(r.get("verified")) for r in rows]),
    }
    if decode:
        sample["masks"] = torch.from_numpy(decode_rles(rles)) if rles else torch.zeros((0, h, w), dtype=torch.bool)
    else:
        sample["rles"] = rles
    if image is not None:
        sample["image"] = torch.from_numpy(np.ascontiguousarray(image))
    return sample


class _RankAware(IterableDataset):
    """Keeps the rank when the dataset is pickled into DataLoader workers. A worker started by "spawn" (the
    default inside torch.multiprocessing.spawn, and on macOS) has no process group of its own, so the
    rank is resolved in the process that pickles the dataset, which is the rank's main process."""

    rank: int | None
    world_size: int | None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if state.get("rank") is None or state.get("world_size") is None:
            found = detect_rank()
            if found is not None:
                state["rank"], state["world_size"] = found
        return state


def collate_samples(samples: list[dict]) -> list[dict]:
    """DataLoader collate_fn that keeps samples as a list (masks of different sizes don't stack)."""
    return samples


# ----------------------------------------------------------------------------------------------------------
# SA-1B tars


def _sa1b_rows(doc: dict) -> list[dict]:
    """An SA-1B image JSON -> store-like rows (our lineage when present, SA-1B's ids otherwise)."""
    img = doc["image"]
    image_id = img.get(exports.LINEAGE_KEY, {}).get("image_id", str(img["image_id"]))
    rows = []
    for ann in doc["annotations"]:
        lin = ann.get(exports.LINEAGE_KEY, {})
        h, w = ann["segmentation"]["size"]
        rows.append({"image_id": image_id, "mask_id": lin.get("mask_id", str(ann["id"])), "height": h, "width": w,
                     "rle": ann["segmentation"]["counts"], "bbox": ann["bbox"], "area": ann["area"],
                     "predicted_iou": ann.get("predicted_iou"), "stability_score": ann.get("stability_score"),
                     "point_coords": ann.get("point_coords"), "stage": lin.get("stage"), "round": lin.get("round"),
                     "verified": lin.get("verified", False)})
    return rows


class SA1BTarDataset(_RankAware):
    """Images and masks from SA-1B tars: an export of ours (folder or s3:// prefix with index.json), or
    a list of tar paths (e.g. Meta's SA-1B files). Units of work are tars; items are images.

    per: "image" (one sample per image, with `image` unless load_images=False) or "mask".
    verify: check each tar against the index's sha256 before reading it (raises naming the tar).
    """

    def __init__(self, source: str | Sequence[str], per: Literal["image", "mask"] = "image",
                 decode: bool = True, load_images: bool = True, verify: bool = True,
                 split: str | None = None, s3_endpoint_url: str | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.per, self.decode, self.load_images, self.verify = per, decode, load_images, verify
        self.s3_endpoint_url, self.rank, self.world_size = s3_endpoint_url, rank, world_size
        if isinstance(source, (str, Path)):
            self.root: str | None = str(source)
            index = exports.read_index(self.root, s3_endpoint_url)
            if index.get("format") != "sa1b":
                raise exports.ExportError(f"{source}: is a {index.get('format')!r} export, not sa1b")
            self.entries = [e for e in index["files"] if split is None or e["split"] == split]
        else:
            self.root = None
            self.entries = [{"path": str(p)} for p in source]

    def _open(self, entry: dict):
        if self.root is None:
            return open(entry["path"], "rb")
        return exports.open_export_file(self.root, entry, self.s3_endpoint_url, verify=self.verify)

    def __iter__(self) -> Iterator[dict]:
        reader, readers = reader_slot(self.rank, self.world_size)
        for share in shares_for(reader, readers, len(self.entries)):
            with self._open(self.entries[share.unit]) as f:
                for i, (doc, _name, data) in enumerate(exports.iter_sa1b_tar(f)):
                    if not share.takes(i):
                        continue
                    rows = _sa1b_rows(doc)
                    if self.per == "mask":
                        for row in rows:
                            yield _mask_sample(row, self.decode)
                        continue
                    image = None
                    if self.load_images and data:

                        try:
                            image = decode_image(data, f"{self.entries[share.unit]['path']}:{_name}")
                        except BadImage as e:
                            log.warning("skipping %s", e)
                            continue
                    img = doc["image"]
                    image_id = img.get(exports.LINEAGE_KEY, {}).get("image_id", str(img["image_id"]))
                    yield _image_sample(image_id, (int(img["height"]), int(img["width"])), rows, self.decode, image)


# ----------------------------------------------------------------------------------------------------------
# The shard store


def _shard_view(store: "MaskStore", info: "ShardInfo") -> "MaskStore":
    """The store seen through one shard: the store's own `iter_batches` (filters, pushdown, corruption
    and schema checks) over that shard alone. The store reads its shard list through `shards()`."""
    view = object.__new__(type(store))
    view.__dict__.update(store.__dict__)
    view.shards = lambda: [info]  # an instance attribute shadows the method, for this view only
    return view


class MaskShardDataset(_RankAware):
    """Masks from the shard store, split over ranks and DataLoader workers by shard.

    store: a MaskStore or its URI. filters: those of `MaskStore.iter_batches` (stage, round, verified,
    min_predicted_iou, min_stability_score, image_ids, model_version, origin).
    per: "mask" (one sample per mask) or "image" (one per image and shard: a shard holds one stage-round,
    so an image annotated in several rounds comes once per round).
    images: an ImageSource or URI; with per="image", samples carry `image` (H, W, 3) uint8 at the masks'
    resolution (images that can't be read are skipped with a warning).
    The shard list is pinned when the dataset is made, so every reader sees the same units even if a
    stage commits meanwhile: build it once (e.g. in the Ray Train driver) and hand it to the workers.
    """

    def __init__(self, store: "MaskStore | str", per: Literal["mask", "image"] = "mask", decode: bool = True,
                 images: "ImageSource | str | None" = None, s3_endpoint_url: str | None = None,
                 rank: int | None = None, world_size: int | None = None, **filters: Any):
        super().__init__()

        self.store = store if isinstance(store, MaskStore) else MaskStore(str(store), s3_endpoint_url=s3_endpoint_url)
        self.images = images if images is None or isinstance(images, ImageSource) else \
            ImageSource(str(images), s3_endpoint_url=s3_endpoint_url)
        if per not in ("mask", "image"):
            raise ValueError(f"per={per!r}: expected 'mask' or 'image'")
        self.per, self.decode, self.filters = per, decode, filters
        self.rank, self.world_size = rank, world_size
        self.shard_infos = list(self.store.shards())

    def _image(self, image_id: str) -> np.ndarray | None:

        ref = self.images.ref(image_id)
        try:
            return decode_image(self.images.store.read_bytes(ref.key), ref.uri)
        except (BadImage, StoreError) as e:
            log.warning("skipping image %s: %s", image_id, e)
            return None

    def _rows(self, info: "ShardInfo") -> Iterator[dict]:
        for batch in _shard_view(self.store, info).iter_batches(**self.filters):
            yield from batch.to_pylist()

    def _images_of(self, info: "ShardInfo") -> Iterator[tuple[str, list[dict]]]:
        """(image_id, rows) per image of one shard (rows of a shard are sorted by image id)."""
        current, rows = None, []
        for row in self._rows(info):
            if row["image_id"] != current and rows:
                yield current, rows
                rows = []
            current = row["image_id"]
            rows.append(row)
        if rows:
            yield current, rows

    def __iter__(self) -> Iterator[dict]:
        reader, readers = reader_slot(self.rank, self.world_size)
        for share in shares_for(reader, readers, len(self.shard_infos)):
            info = self.shard_infos[share.unit]
            if self.per == "mask":
                for i, row in enumerate(self._rows(info)):
                    if share.takes(i):
                        yield _mask_sample(row, self.decode)
                continue
            for i, (image_id, rows) in enumerate(self._images_of(info)):
                if not share.takes(i):
                    continue
                image = None
                if self.images is not None:
                    image = self._image(image_id)
                    if image is None:
                        continue
                    if image.shape[:2] != (rows[0]["height"], rows[0]["width"]):
                        log.warning("skipping image %s: %dx%d but its masks are %dx%d", image_id, *image.shape[:2],
                                    rows[0]["height"], rows[0]["width"])
                        continue
                yield _image_sample(image_id, (int(rows[0]["height"]), int(rows[0]["width"])), rows,
                                    self.decode, image)
