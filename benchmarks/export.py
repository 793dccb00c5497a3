"""Export throughput and memory: every export format from a large synthetic store.

Builds a store of `--images` small synthetic PNGs x `--masks-per-image` masks, then runs, each in a
fresh process so that peak RSS (ru_maxrss) belongs to that phase alone:
  baseline  read every column of every shard, batch by batch (what any streaming reader must pay)
  sa1b      the SA-1B export (tars of `--images-per-tar` images)
  coco      the COCO export (train/val split)
  coco-polygons, yolo-seg, hf, webdataset   the other formats (docs/exports.md), each with its round trip: the
            polygon formats' per-mask IoU as their readers rasterise them (the export's summary), hf and
            webdataset read back (pyarrow / tarfile) and up to 2,000 masks compared with the store
and, to show memory stays flat as the data grows, the SA-1B, hf and webdataset exports again on a quarter of
the images.

Prints one line per phase, then (last line) one JSON object:
  sa1b_images_per_s, sa1b_masks_per_s, coco_images_per_s, coco_masks_per_s, peak_rss_mb (the larger export's),
  baseline_rss_mb, sa1b_rss_mb, coco_rss_mb, sa1b_rss_ratio / coco_rss_ratio (to the baseline),
  sa1b_quarter_rss_mb and rss_growth (full / quarter: ~1.0 means flat), *_rss_delta_mb (peak above the
  process's footprint after imports), sa1b_output_mb / coco_output_mb (what holding the output would cost),
  store_mb, images, masks; and per format F: F_masks_per_s, F_bytes_per_mask, F_rss_mb, F_iou_mean, F_iou_min
  (and hf_rss_growth, webdataset_rss_growth: full / quarter).

    .venv/bin/python benchmarks/export.py                      # 20,000 masks (400 images x 50), all formats
    .venv/bin/python benchmarks/export.py --images 4000 --masks-per-image 250 --formats sa1b,coco   # 1M masks
    .venv/bin/python benchmarks/export.py --store runs/demo/store --images-dir runs/demo/synth/images  # the demo's
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over fork+exec from the
    parent, so a child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: the best there is


def build(root: Path, n_images: int, masks_per_image: int, side: int, seed: int = 0) -> dict:
    """Images root/images/img_<i>.png (side x side, random RGB) and a store root/store with one automatic
    round: masks drawn from a pool of distinct random masks (RLE-encoded once, reused)."""
    from PIL import Image

    from storage.images import ImageSource
    from storage.records import MaskRecord, make_mask_id
    from storage.rle import encode_masks, rle_bbox
    from storage.shards import MaskStore

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            root / "images" / f"img_{i:06d}.png", compress_level=1)
    yy, xx = np.mgrid[0:side, 0:side]
    pool_n = 512
    centres = rng.uniform(0, side, (pool_n, 2))
    radii = rng.uniform(2, side / 3, (pool_n, 2))
    pool = ((yy[None] - centres[:, 0, None, None]) / radii[:, 0, None, None]) ** 2 \
        + ((xx[None] - centres[:, 1, None, None]) / radii[:, 1, None, None]) ** 2 <= 1.0
    pool[:, side // 2, side // 2] = True  # never empty
    rles = encode_masks(pool)
    areas, boxes = pool.sum(axis=(1, 2)), rle_bbox(rles)  # (rle_area trips a pycocotools bug at N >= 256)
    store = MaskStore(str(root / "store"))
    refs = ImageSource(str(root / "images")).list()
    t0 = time.perf_counter()
    with store.writer("auto", 1, "bench") as writer:
        for ref in refs:
            picks = rng.integers(0, pool_n, masks_per_image)
            ious = rng.uniform(0.8, 1.0, masks_per_image)
            records = [MaskRecord(image_id=ref.image_id, mask_id=make_mask_id(ref.image_id, "bench", j),
                                  height=side, width=side, rle=rles[k], area=int(areas[k]), bbox=boxes[k].tolist(),
                                  stage="auto", round=1, model_version="bench", predicted_iou=float(ious[j]),
                                  stability_score=float(ious[j]), point_coords=[[float(side / 2), float(side / 2)]])
                       for j, k in enumerate(picks.tolist())]
            writer.add(records)
            writer.image_done(ref.image_id, len(records))
        writer.commit()
    store_mb = sum(p.stat().st_size for p in (root / "store").rglob("*") if p.is_file()) / 2 ** 20
    return {"images": len(refs), "masks": len(refs) * masks_per_image, "build_s": time.perf_counter() - t0,
            "store_mb": store_mb}


def phase(name: str, root: Path, out: Path, images_per_tar: int, limit: int | None) -> dict:
    """One measured phase in this (fresh) process."""
    from storage.exports import ExportFilters, export_coco, export_sa1b, parse_splits
    from storage.images import ImageSource
    from storage.shards import MaskStore

    store = MaskStore(str(root / "store"))
    source = ImageSource(str(root / "images"))
    filters = ExportFilters()
    if limit is not None:
        filters = ExportFilters(image_ids=frozenset(r.image_id for r in source.list()[:limit]))
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    if name == "baseline":
        rows = 0
        for batch in store.iter_batches(**filters.store_kwargs()):
            rows += batch.num_rows
            batch.column("rle").to_pylist()  # touch the payload, as an exporter must
        result = {"masks": rows, "images": None}
    elif name == "sa1b":
        result = export_sa1b(store, str(out), source, filters=filters, images_per_tar=images_per_tar)
    elif name == "coco":
        result = export_coco(store, str(out), filters=filters, splits=parse_splits("train=0.9,val=0.1"))
    elif name in ("coco-polygons", "yolo-seg", "hf", "webdataset"):
        from storage.exports import export

        result = export(name, store, str(out), source, filters=filters, images_per_tar=images_per_tar,
                        **({"splits": parse_splits("train=0.9,val=0.1")} if name == "yolo-seg" else {}))
    else:
        raise SystemExit(f"unknown phase {name!r}")
    seconds = time.perf_counter() - t0
    ious = result.get("polygon_iou") or (read_back(name, store, out) if name in ("hf", "webdataset") else None)
    return {"phase": name, "seconds": seconds, "images": result["images"], "masks": result["masks"],
            "peak_rss_mb": _peak_rss_mb(), "rss_at_start_mb": rss_before,
            "iou_mean": ious and ious["mean"], "iou_min": ious and ious["min"]}


def read_back(name: str, store, out: Path, limit: int = 2000) -> dict:
    """Up to `limit` masks of an hf or webdataset export decoded and compared with the store's (IoU)."""
    import tarfile

    import pyarrow.parquet as pq
    from pycocotools import mask as mask_utils

    truth = {r["mask_id"]: r for r in store.read_table(columns=["mask_id", "height", "width", "rle"]).to_pylist()}
    found = []
    if name == "hf":
        for path in sorted((out / "data").glob("*.parquet")):
            for row in pq.read_table(path, columns=["objects"]).to_pylist():
                found += [(o["mask_id"], o["segmentation"]) for o in row["objects"]]
            if len(found) >= limit:
                break
    else:
        for path in sorted(out.rglob("*.tar")):
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        doc = json.load(tar.extractfile(m))
                        found += [(a["sa_engine"]["mask_id"], a["segmentation"]) for a in doc["annotations"]]
            if len(found) >= limit:
                break
    ious = []
    for mask_id, seg in found[:limit]:
        r = truth[mask_id]
        a = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        b = mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle"]}).astype(bool)
        ious.append(float((a & b).sum() / max((a | b).sum(), 1)))
    return {"mean": float(np.mean(ious)), "min": float(np.min(ious))}


def run_phase(name: str, root: Path, images_per_tar: int, limit: int | None = None) -> dict:
    out = root / f"out-{name}-{limit or 'all'}"
    cmd = [sys.executable, __file__, "--phase", name, "--root", str(root), "--out", str(out),
           "--images-per-tar", str(images_per_tar)] + (["--limit", str(limit)] if limit else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_mb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2 ** 20 \
        if out.exists() else 0.0
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--masks-per-image", type=int, default=50)
    ap.add_argument("--formats", default="sa1b,coco,coco-polygons,yolo-seg,hf,webdataset")
    ap.add_argument("--store", type=Path, help="measure an existing local store (e.g. runs/demo/store) instead of "
                                                "building a synthetic one; with --images-dir")
    ap.add_argument("--images-dir", type=Path, help="the image folder of --store (e.g. runs/demo/synth/images)")
    ap.add_argument("--side", type=int, default=64, help="image side in pixels")
    ap.add_argument("--images-per-tar", type=int, default=250)
    ap.add_argument("--root", type=Path, help="(internal) data folder of a phase")
    ap.add_argument("--phase", help="(internal) run one phase in this process")
    ap.add_argument("--out", type=Path, help="(internal) output of a phase")
    ap.add_argument("--limit", type=int, help="(internal) export only the first N images")
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.root, args.out, args.images_per_tar, args.limit)))
        return

    root = Path(tempfile.mkdtemp(prefix="sa-bench-export-"))
    try:
        if args.store:  # an existing store: linked in, read only
            from storage.shards import MaskStore

            (root / "store").symlink_to(args.store.resolve())
            (root / "images").symlink_to(args.images_dir.resolve())
            table = MaskStore(str(root / "store")).read_table(columns=["image_id"])
            built = {"images": len(set(table.column("image_id").to_pylist())), "masks": table.num_rows,
                     "store_mb": sum(p.stat().st_size for p in args.store.rglob("*") if p.is_file()) / 2 ** 20}
            args.images = built["images"]
        else:
            built = build(root, args.images, args.masks_per_image, args.side)
        print(json.dumps({"built": built}), flush=True)
        base = run_phase("baseline", root, args.images_per_tar)
        formats = args.formats.split(",")
        runs = {f: run_phase(f, root, args.images_per_tar) for f in formats}
        quarter = {f: run_phase(f, root, args.images_per_tar, limit=max(1, args.images // 4))
                   for f in ("sa1b", "hf", "webdataset") if f in formats}
        figures = {"baseline_rss_mb": round(base["peak_rss_mb"], 1),
                   "baseline_masks_per_s": round(base["masks"] / base["seconds"], 1),
                   "baseline_rss_delta_mb": round(base["peak_rss_mb"] - base["rss_at_start_mb"], 1)}
        for f, r in runs.items():
            key = f.replace("-", "_")
            figures.update({
                f"{key}_images_per_s": round(r["images"] / r["seconds"], 1),
                f"{key}_masks_per_s": round(r["masks"] / r["seconds"], 1),
                f"{key}_bytes_per_mask": round(r["output_mb"] * 2 ** 20 / max(r["masks"], 1), 1),
                f"{key}_output_mb": round(r["output_mb"], 1),
                f"{key}_rss_mb": round(r["peak_rss_mb"], 1),
                f"{key}_rss_ratio": round(r["peak_rss_mb"] / base["peak_rss_mb"], 3),
                f"{key}_rss_delta_mb": round(r["peak_rss_mb"] - r["rss_at_start_mb"], 1)})
            if r.get("iou_mean") is not None:
                figures.update({f"{key}_iou_mean": round(r["iou_mean"], 5), f"{key}_iou_min": round(r["iou_min"], 5)})
        for f, q in quarter.items():
            key = f.replace("-", "_")
            figures[f"{key}_quarter_rss_mb"] = round(q["peak_rss_mb"], 1)
            figures[f"{key}_rss_growth"] = round(runs[f]["peak_rss_mb"] / q["peak_rss_mb"], 3)
        figures.update({"peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs.values()), 1),
                        "rss_growth": figures.get("sa1b_rss_growth"),
                        "store_mb": round(built["store_mb"], 1), "images": built["images"],
                        "masks": built["masks"]})
        print(json.dumps(figures))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
