"""The automatic stage on a two-node Ray cluster on this machine (a head and a worker node, each a raylet of its
own: `ray.cluster_utils.Cluster`), with the worker node killed mid-stage. Run by tests/test_multinode.py in a
process of its own (a Ray driver attaches to one cluster per process). Prints, last, one JSON line.

    python tests/multinode_stage.py WORKDIR [--kill]
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from engine.integrations import runtime
    from engine.integrations.config import load_config
    from engine.integrations.synth import write_synthetic_dataset
    from stages.auto import run_auto_stage

    work, kill = Path(sys.argv[1]), "--kill" in sys.argv
    write_synthetic_dataset(work / "data", n_images=16, seed=5, size=96)
    # A dead node is noticed in ~2 s instead of Ray's default ~15-30 s (health checks every 3 s, 5 misses).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 128 * 2**20,
        "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                           "health_check_failure_threshold": 3}})
    # The worker node is the only place the pool's actors fit at first (the head's CPU is held), so the
    # first images are made there; it dies mid-stage and the pool goes on on the head.
    worker = cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    hold = ray.remote(num_cpus=1)(lambda: time.sleep(3600)).remote() if kill else None
    cfg = load_config(None, {
        "workdir": str(work / "run"), "images.source": str(work / "data" / "images"), "images.ground_truth": None,
        "storage.root": str(work / ("killed" if kill else "calm")), "ray.address": cluster.address,
        "ray.cpus_per_actor": 0.5, "stages.auto.num_actors": 2, "stages.auto.images_per_commit": 2,
        "stages.auto.points_per_side": 8, "stages.auto.pred_iou_thresh": 0.0,
        "stages.auto.stability_score_thresh": 0.0, "stages.auto.min_mask_region_area": 0,
        "stages.auto.max_mask_fraction": 1.0, "model.preset": "compact"})
    store = runtime.mask_store(cfg)
    killed_after = None

    def killer() -> None:
        nonlocal killed_after
        while len(store.images_done("auto")) < 4:
            time.sleep(0.2)
        killed_after = len(store.images_done("auto"))
        cluster.remove_node(worker, allow_graceful=False)
        ray.cancel(hold, force=True)  # the head's CPU is free for the pool now

    thread = threading.Thread(target=killer, daemon=True) if kill else None
    if thread:
        thread.start()
    t0 = time.monotonic()
    summary = run_auto_stage(cfg, 1, None, show_progress=False).to_dict()
    seconds = time.monotonic() - t0
    index = store.images_table("auto").column("image_id").to_pylist()
    staged = len(store.store.list("staging"))  # parts the dead node's actors wrote and nobody adopted
    removed = len(store.collect_garbage(min_age_s=0))
    ids = store.read_table(columns=["mask_id"]).column("mask_id").to_pylist()
    result = json.dumps({"images": summary["images"], "masks": summary["masks"], "index_rows": len(index),
                      "distinct_images": len(set(index)), "mask_rows": len(ids), "distinct_masks": len(set(ids)),
                      "mask_ids": sorted(ids), "killed_after_images": killed_after,
                      "staged_left": staged, "gc_removed": removed, "staged_after_gc": len(store.store.list("staging")),
                      "nodes_alive": sum(n["Alive"] for n in ray.nodes()), "seconds": round(seconds, 1)})
    # A file, not stdout: Ray's raylet messages reach stdout after ours whenever they like.
    (work / "result.json").write_text(result)
    print(result)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
