"""Benchmark: the automatic stage's data path at scale — workers write their shards, the driver only commits.

1. Model: the compact model trained here for `--train-steps` steps on synthetic scenes (cached under
   benchmarks/.cache/), loose filters (IoU / stability 0, NMS 0.7), so each image yields tens of masks.
2. `run_auto_stage` on `--images` synthetic scenes of `--size` px with 1 and then 2 actors (0.5 CPU, 1 torch
   thread each), into fresh stores, after waiting (up to --wait-quiet s) for a 1-minute load below 1.5; before
   each, `free_core_scaling` (benchmarks/amg.py) times 2 plain CPU-bound processes against 1: the ceiling for
   `actor_scaling_2v1` the (shared) machine offers at that moment.
3. Per run: what the actors handed the driver per mask (`driver_bytes_per_mask`: part descriptors and a line
   per image; the masks themselves go from the actor to the store), what the old path shipped (every
   MaskRecord pickled to the driver: `pickled_records_bytes_per_mask`, measured on the same masks), the
   steady mask rate, and a DuckDB glob over `shards/*.parquet` against the manifest's row count.

4. The training loader (engine/retrain.py `store_sampler`: the shard store through storage.datasets, a buffer
   of `train.buffer_images` scenes): peak RSS of a fresh process drawing 2 samples per scene from 1x
   (`--loader-images`, 96 scenes of 256 px: the demo's bootstrap set) and 10x that, with the buffer at 1x.
5. The manifest at 10⁴ and 10⁵ shards: its size and the time one more commit takes (read, parse, add a shard,
   compare-and-swap write) — when to compact or partition it.

Last line: JSON with driver_bytes_per_mask, pickled_records_bytes_per_mask, masks_per_s, actor_scaling_2v1,
machine_2proc_scaling, glob_rows_match_manifest, manifest_kb_1e4/1e5, manifest_commit_ms_1e4/1e5,
peak_rss_mb_1x / _10x and the sizes used.

    python benchmarks/scaleout.py [--images 24] [--size 256] [--points-per-side 16] [--train-steps 150]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.amg import free_core_scaling, wait_for_quiet  # noqa: E402
from engine.integrations.synth import make_scene, scene_rng, write_synthetic_dataset  # noqa: E402
from model.segmenter import Segmenter  # noqa: E402
from model.train import TrainSettings, dataset_sampler, train  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def trained_model(steps: int) -> Path:
    """The compact model after `steps` training steps on 8 synthetic scenes (seeded; cached)."""
    out = CACHE / f"scaleout-compact-{steps}"
    if (out / "sa_engine.json").is_file():
        return out
    torch.set_num_threads(2)
    scenes = [make_scene(scene_rng(21, i), 256) for i in range(8)]
    seg = Segmenter.new("compact", seed=0)
    train(seg, dataset_sampler([s[0] for s in scenes], [s[1] for s in scenes]),
          TrainSettings(max_steps=steps, minutes=30, batch_images=4, masks_per_image=4, crop_share=0.0, threads=2))
    seg.save(out, metadata={"source": f"benchmarks/scaleout.py, {steps} steps"})
    return out


def labelled_store(folder: Path, n_images: int, size: int) -> tuple[str, str]:
    """A store of `n_images` synthetic scenes' ground-truth masks (verified, manual) and their images folder."""
    from storage.records import MaskRecord, make_mask_id
    from storage.shards import MaskStore

    write_synthetic_dataset(folder / "data", n_images=n_images, seed=41, size=size)
    coco = json.loads((folder / "data" / "annotations.json").read_text())
    names = {im["id"]: im for im in coco["images"]}
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    store = MaskStore(str(folder / "store"))
    with store.writer("manual", 1, None) as w:
        for coco_id, im in names.items():
            anns = by_image.get(coco_id, [])
            w.add([MaskRecord(image_id=im["file_name"], mask_id=make_mask_id(im["file_name"], a["id"]),
                              height=im["height"], width=im["width"],
                              rle={"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()},
                              area=int(a["area"]), bbox=[float(v) for v in a["bbox"]], stage="manual", round=1,
                              origin="manual", verified=True) for a in anns])
            w.image_done(im["file_name"], len(anns))
    return str(folder / "store"), str(folder / "data" / "images")


def loader_rss(store: str, images: str, buffer_images: int, draws: int) -> float:
    """Peak RSS (MB) of a fresh process that draws `draws` training samples from `store` through the round's
    sampler (engine/retrain.py store_sampler: storage.datasets, `train.buffer_images`)."""
    import subprocess

    code = f"""
import resource, numpy as np
from engine.integrations.config import load_config
from engine.retrain import store_sampler
cfg = load_config(None, {{"workdir": "{Path(store).parent}/run", "images.source": "{images}",
                          "storage.root": "{store}", "train.buffer_images": {buffer_images}}})
sample, _ = store_sampler(cfg, [{{"root": "{store}", "images": "{images}", "manual_weight": 2.0,
                                  "filters": {{"verified": True}}}}])
rng = np.random.default_rng(0)
for _ in range({draws}):
    sample(rng)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


def manifest_at(n_shards: int, folder: Path) -> dict:
    """The manifest with `n_shards` entries: its size and the time of one more commit (read, parse, add one
    shard, write with the compare-and-swap), best of 3."""
    import time

    from storage.shards import Manifest, MaskStore, ShardInfo

    store = MaskStore(str(folder))
    shards = [ShardInfo(path=f"shards/{i:032x}.parquet", rows=2200, sha256="0" * 64, bytes=64 << 20, stage="auto",
                        round=1, model_version="sam-vit-h-0123456789ab", min_image_id=f"img{i:08d}.jpg",
                        max_image_id=f"img{i:08d}.jpg", commit=f"{i:032x}", created_at="2026-12-05T00:00:00+00:00")
              for i in range(n_shards)]
    store.store.write_bytes("manifest.json", Manifest(shards=shards, generation=1).to_bytes())
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        store._swap_manifest(shards[:1], [], {"id": "bench", "kind": "append"})
        best = min(best, time.perf_counter() - t)
    return {"kb": round(store.store.size("manifest.json") / 1024), "commit_ms": round(best * 1000, 1)}


def run_once(args, checkpoint: Path, images: Path, work: Path, actors: int) -> dict:
    import duckdb

    from engine.integrations import runtime
    from engine.integrations.config import load_config
    from stages.auto import run_auto_stage

    cfg = load_config(None, {
        "workdir": str(work / f"a{actors}"), "images.source": str(images), "images.ground_truth": None,
        "storage.root": str(work / f"a{actors}" / "store"), "model.checkpoint": str(checkpoint),
        "ray.num_cpus": 2, "ray.cpus_per_actor": 0.5, "stages.auto.num_actors": actors,
        "stages.auto.points_per_side": args.points_per_side, "stages.auto.images_per_batch": args.images_per_batch,
        "stages.auto.images_per_commit": args.images_per_commit, "stages.auto.pred_iou_thresh": 0.0,
        "stages.auto.stability_score_thresh": 0.0, "stages.auto.min_mask_region_area": 0})
    s = run_auto_stage(cfg, 1, None, show_progress=False).to_dict()
    store = runtime.mask_store(cfg)
    pickled = sum(len(pickle.dumps([r])) for r in store.iter_records())  # what each image's records cost before
    glob = duckdb.sql(f"select count(*) from read_parquet('{store.uri}/shards/*.parquet')").fetchall()[0][0]
    s.update(pickled_records_bytes_per_mask=pickled / max(s["masks"], 1), glob_rows=glob,
             manifest_rows=sum(x.rows for x in store.shards()))
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--images-per-batch", type=int, default=4)
    ap.add_argument("--images-per-commit", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--wait-quiet", type=float, default=300.0)
    ap.add_argument("--loader-images", type=int, default=96, help="1x: the demo's bootstrap set (96 scenes)")
    ap.add_argument("--buffer-images", type=int, default=96, help="train.buffer_images for the loader figures")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    checkpoint = trained_model(args.train_steps)

    from engine.integrations.cluster import init_ray, shutdown_ray

    with tempfile.TemporaryDirectory(prefix="sa-scaleout-") as tmp:
        work = Path(tmp)
        write_synthetic_dataset(work / "data", n_images=args.images, seed=31, size=args.size)
        init_ray("local", num_cpus=2)
        runs, ceilings, loads = {}, {}, {}
        try:
            for actors in (1, 2):
                loads[actors] = wait_for_quiet(args.wait_quiet)
                ceilings[actors] = free_core_scaling()
                runs[actors] = s = run_once(args, checkpoint, work / "data" / "images", work, actors)
                print(f"{actors} actor(s), load {loads[actors]:.2f}, 2-process ceiling {ceilings[actors]:.2f}x: "
                      f"{s['images']} images, {s['masks']} masks in {s['parts']} parts / {s['commits']} commits; "
                      f"steady {s['steady_images_per_s']:.3f} images/s, {s['steady_masks_per_s']:.1f} masks/s; "
                      f"driver {s['driver_bytes_per_mask']:.2f} B/mask (pickled records: "
                      f"{s['pickled_records_bytes_per_mask']:.0f} B/mask); DuckDB glob {s['glob_rows']} rows, "
                      f"manifest {s['manifest_rows']}", flush=True)
        finally:
            shutdown_ray()
        manifests = {n: manifest_at(n, work / f"manifest{n}") for n in (10_000, 100_000)}
        rss = {}
        for times in (1, 10):
            store, images = labelled_store(work / f"loader{times}", args.loader_images * times, 256)
            rss[times] = loader_rss(store, images, args.buffer_images, draws=2 * args.loader_images * times)
            print(f"training loader, {times}x ({args.loader_images * times} scenes), buffer {args.buffer_images}: "
                  f"peak RSS {rss[times]:.0f} MB", flush=True)
        # the same 10x held whole (a buffer as large as the data: what training did before it streamed)
        rss["whole"] = loader_rss(store, images, args.loader_images * 10, draws=2 * args.loader_images * 10)
        print(f"training loader, 10x held whole: peak RSS {rss['whole']:.0f} MB", flush=True)
    for n, m in manifests.items():
        print(f"manifest with {n} shards: {m['kb']} KB, one commit (read, parse, add, CAS write) {m['commit_ms']} ms")
    one, two = runs[1], runs[2]
    print(json.dumps({
        "peak_rss_mb_1x": round(rss[1]), "peak_rss_mb_10x": round(rss[10]),
        "rss_ratio_10x_1x": round(rss[10] / rss[1], 3), "peak_rss_mb_10x_held_whole": round(rss["whole"]), "buffer_images": args.buffer_images,
        "manifest_kb_1e4": manifests[10_000]["kb"], "manifest_commit_ms_1e4": manifests[10_000]["commit_ms"],
        "manifest_kb_1e5": manifests[100_000]["kb"], "manifest_commit_ms_1e5": manifests[100_000]["commit_ms"],
        "driver_bytes_per_mask": round(max(one["driver_bytes_per_mask"], two["driver_bytes_per_mask"]), 2),
        "pickled_records_bytes_per_mask": round(two["pickled_records_bytes_per_mask"], 1),
        "masks_per_s": round(two["steady_masks_per_s"], 2),
        "actor_scaling_2v1": round(two["steady_images_per_s"] / max(one["steady_images_per_s"], 1e-9), 3),
        "machine_2proc_scaling": [round(ceilings[1], 2), round(ceilings[2], 2)],
        "load_before": [round(loads[1], 2), round(loads[2], 2)],
        "glob_rows_match_manifest": all(r["glob_rows"] == r["manifest_rows"] for r in (one, two)),
        "masks_per_image": round(two["masks_per_image"], 1),
        "images": args.images, "size": args.size, "points_per_side": args.points_per_side,
        "images_per_batch": args.images_per_batch, "train_steps": args.train_steps}))


if __name__ == "__main__":
    main()
