"""A small real mask store + image folder for the export and dataset tests (no mocks: real shards, real PNGs)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from storage.images import ImageSource
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_masks, rle_area, rle_bbox
from storage.shards import MaskStore

# (height, width) of each synthetic image: sizes differ so size mix-ups would show.
IMAGE_SIZES = [(40, 56), (48, 48), (36, 60), (52, 44), (40, 40), (44, 64), (32, 48), (56, 40)]


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) bool: ellipses and rectangles of varied size, each non-empty."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        cy, cx = rng.integers(4, h - 4), rng.integers(4, w - 4)
        ry, rx = rng.integers(2, h // 3), rng.integers(2, w // 3)
        if i % 2:
            out[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            out[i, max(0, cy - ry):cy + ry, max(0, cx - rx):cx + rx] = True
    return out


def write_images(folder: Path, sizes=IMAGE_SIZES, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")


def make_records(image_id: str, h: int, w: int, n: int, stage: str, round_: int, seed: int,
                 verified: bool, model_version: str) -> list[MaskRecord]:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, n, h, w)
    rles = encode_masks(masks)
    areas, boxes = rle_area(rles), rle_bbox(rles)
    created = datetime(2026, 11, 1, tzinfo=timezone.utc) + timedelta(seconds=seed)
    records = []
    for i, rle in enumerate(rles):
        human = stage == "manual"
        records.append(MaskRecord(
            image_id=image_id, mask_id=make_mask_id(image_id, stage, round_, model_version, i), height=h, width=w,
            rle=rle, area=int(areas[i]), bbox=boxes[i].tolist(), stage=stage, round=round_,
            model_version=model_version,
            predicted_iou=None if human else float(rng.uniform(0.7, 1.0)),
            stability_score=None if human else float(rng.uniform(0.8, 1.0)),
            point_coords=[[float(rng.uniform(0, w)), float(rng.uniform(0, h))]],
            crop_box=None if i % 3 else [0.0, 0.0, float(w) / 2, float(h) / 2],
            origin="manual" if human else "auto", annotator="ann-1" if human else None, verified=verified,
            source={"ls_task": i} if human else None, clicks=3 if human else None,
            lead_time_s=4.5 if human else None, created_at=created,
        ))
    return records


def build_store(root: Path) -> tuple[MaskStore, ImageSource, list[MaskRecord]]:
    """Images in root/images; a store in root/store with a manual round 0 (images 0-3, verified) and automatic
    rounds 1 and 2 (all images). Returns the store, the image source and every record written."""
    write_images(root / "images")
    source = ImageSource(str(root / "images"))
    refs = source.list()
    store = MaskStore(str(root / "store"))
    all_records: list[MaskRecord] = []
    plan = [("manual", 0, refs[:4], True), ("auto", 1, refs, False), ("auto", 2, refs[::2], False)]
    for stage, round_, chosen, verified in plan:
        with store.writer(stage, round_, f"m{round_}") as writer:
            for k, ref in enumerate(chosen):
                h, w = source.load(ref).pixels.shape[:2]
                records = make_records(ref.image_id, h, w, 2 + (k + round_) % 4, stage, round_,
                                       seed=100 * round_ + k, verified=verified, model_version=f"m{round_}")
                writer.add(records)
                writer.image_done(ref.image_id, len(records))
                all_records.extend(records)
            writer.commit()
    return store, source, all_records
