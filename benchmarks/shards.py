"""Benchmark: encode realistic masks to COCO RLE and write them as committed mask shards.

Masks are the visible object/part masks of synthetic scenes at 1500 px (SA-1B's resolution),
held as (N, H, W) bool like every stage produces them. The floor is pycocotools' encode alone on
the same masks already laid out as it wants them (Fortran (H, W, N) uint8, prepared outside the
timer); the full path (RLE + area + bbox + records + sorted zstd Parquet + sha256 + manifest) is
measured against it in the same run. Best of `--repeats` for both, to damp a shared machine.
Last line: JSON with masks_per_s and ratio_to_pycocotools_encode.

    python benchmarks/shards.py [--masks 200] [--size 1500]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np
from pycocotools import mask as mask_utils

from engine.integrations.synth import make_scene, scene_rng
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_masks, rle_area, rle_bbox
from storage.shards import MaskStore


def realistic_masks(n_masks: int, size: int, seed: int) -> list[np.ndarray]:
    """Per-image batches (N_i, size, size) bool from synthetic scenes, n_masks in total."""
    batches, total, i = [], 0, 0
    while total < n_masks:
        _, masks, _ = make_scene(scene_rng(seed, i), size)
        masks = masks[: n_masks - total]
        batches.append(masks)
        total += len(masks)
        i += 1
    return batches


def encode_and_write(batches: list[np.ndarray], root: str, shard_target_mb: float) -> MaskStore:
    store = MaskStore(root, shard_target_mb=shard_target_mb)
    with store.writer("auto", 0, "bench") as writer:
        for i, masks in enumerate(batches):
            image_id = f"bench-{i:05d}.jpg"
            rles = encode_masks(masks)
            areas, boxes = rle_area(rles), rle_bbox(rles)
            h, w = masks.shape[1:]
            writer.add([MaskRecord(image_id=image_id, mask_id=make_mask_id(image_id, "auto", 0, k), height=h,
                                   width=w, rle=rle, area=int(areas[k]), bbox=boxes[k].tolist(), stage="auto",
                                   round=0, model_version="bench", predicted_iou=0.9, stability_score=0.95,
                                   point_coords=[[0.0, 0.0]]) for k, rle in enumerate(rles)])
            writer.image_done(image_id, len(rles))
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=200)
    parser.add_argument("--size", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-target-mb", type=float, default=64.0)
    args = parser.parse_args()

    t = time.perf_counter()
    batches = realistic_masks(args.masks, args.size, args.seed)
    n = sum(len(b) for b in batches)
    density = float(np.mean([b.mean() for b in batches]))
    print(f"{n} masks from {len(batches)} scenes at {args.size}px (mean fill {density:.3f}), "
          f"made in {time.perf_counter() - t:.1f}s")
    fortran = [np.asfortranarray(b.transpose(1, 2, 0).astype(np.uint8)) for b in batches]

    floor_s, floor_transpose_s, ours_s = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for f in fortran:
            mask_utils.encode(f)
        floor_s.append(time.perf_counter() - t)

        t = time.perf_counter()  # what calling pycocotools from (N, H, W) bool costs
        for b in batches:
            mask_utils.encode(np.asfortranarray(b.transpose(1, 2, 0).view(np.uint8)))
        floor_transpose_s.append(time.perf_counter() - t)

        root = tempfile.mkdtemp(prefix="sa-bench-shards-")
        try:
            t = time.perf_counter()
            store = encode_and_write(batches, root, args.shard_target_mb)
            ours_s.append(time.perf_counter() - t)
            shards = store.shards()
            assert sum(s.rows for s in shards) == n
        finally:
            shutil.rmtree(root, ignore_errors=True)

    floor = n / min(floor_s)
    floor_transpose = n / min(floor_transpose_s)
    ours = n / min(ours_s)
    print(f"pycocotools encode alone (Fortran input): {floor:8.1f} masks/s")
    print(f"pycocotools encode from (N, H, W) bool:   {floor_transpose:8.1f} masks/s")
    print(f"sa-engine RLE + shards + manifest:        {ours:8.1f} masks/s  ({ours / floor:.2f}x the floor)")
    print(json.dumps({
        "masks": n, "size": args.size, "masks_per_s": round(ours, 1),
        "pycocotools_encode_masks_per_s": round(floor, 1),
        "ratio_to_pycocotools_encode": round(ours / floor, 3),
        "pycocotools_encode_from_nhw_masks_per_s": round(floor_transpose, 1),
        "shards": len(shards), "shard_bytes": sum(s.bytes for s in shards),
    }))


if __name__ == "__main__":
    main()
