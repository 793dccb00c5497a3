"""`sa-engine demo`: the whole engine from nothing, on the embedded synthetic data set.

Everything lands under one work dir: the data set and its holdout, the config the demo ran with
(`engine.yaml`, so `sa-engine run --config …` can resume or repeat it), the mask store, the models,
the Label Studio projects (a real server with simulated annotators), the exports and the report.
"""
from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Callable

import yaml

from engine.integrations import runtime
from engine.integrations.cluster import init_ray
from engine.integrations.config import load_config, set_dotted
from engine.integrations.synth import write_synthetic_dataset
from engine.report import format_rounds_table, holdout_size, write_report
from engine.rounds import run_rounds
from storage.exports import ExportFilters, export

# Sized so the whole demo takes about 15 minutes on a 2-core machine (docs/model.md has the timings).
DEMO_IMAGES = 40  # manual 2 x 6, semi 1 x 6, automatic the remaining 22
DEMO_HOLDOUT = 12
DEMO_SIZE = 256
# A setting that needs adaptation, as SAM's did: the starting model learns on one family of scenes, the rounds
# annotate another it has not seen (engine/integrations/synth.py FAMILIES); the holdout is of the annotated
# family, and a general holdout of the starting family guards against forgetting.
DEMO_FAMILY, BOOTSTRAP_FAMILY = "pebbles", "shapes"
DEMO_DATA = (("synth", DEMO_IMAGES, 0, DEMO_FAMILY), ("synth-holdout", DEMO_HOLDOUT, 1, DEMO_FAMILY),
             ("synth-general", DEMO_HOLDOUT, 1, BOOTSTRAP_FAMILY))


def demo_config(workdir: Path) -> dict:
    """The demo's engine config (a plain dict, written to <workdir>/engine.yaml)."""
    return {
        "workdir": str(workdir),
        "seed": 0,
        "images": {"source": "synth/images", "ground_truth": "synth/annotations.json",
                   "holdout_source": "synth-holdout/images",
                   "holdout_ground_truth": "synth-holdout/annotations.json",
                   "general_holdout_source": "synth-general/images",
                   "general_holdout_ground_truth": "synth-general/annotations.json"},
        "storage": {"root": "store"},
        # Budgets in optimiser steps: the same models on an idle laptop and a busy machine (about 3 and 1.5 minutes
        # on an idle 2-core machine; a busy one takes longer and trains the same steps)
        "model": {"preset": "compact", "bootstrap_steps": 700, "bootstrap_images": 96,
                  "bootstrap_image_size": DEMO_SIZE, "bootstrap_family": BOOTSTRAP_FAMILY},
        # A CPU-trained model's IoU head is far below SAM's 0.88: the semi and automatic stages choose their
        # thresholds from the verified masks of earlier rounds, starting from loose floors.
        "stages": {"manual": {"rounds": 2, "images_per_round": 6},
                   # a prefill counts as right at IoU >= 0.75 (as the automatic stage's below): the CPU model's
                   # masks rarely reach SAM's 0.9, and at 0.9 the triages have next to nothing to tell apart
                   "semi": {"rounds": 1, "images_per_round": 6, "precision_iou": 0.75},
                   # the automatic stage keeps masks 80 % of which match a verified mask at IoU >= 0.75
                   "auto": {"points_per_side": 16, "num_actors": 2, "images_per_commit": 4, "calibrate": True,
                            "target_precision": 0.8, "precision_iou": 0.75}},
        "calibration": {"pred_iou_floor": 0.0, "stability_floor": 0.0},  # the loose floors history is re-run with
        "labelstudio": {"managed": True},
        "ray": {"address": "local"},
        "train": {"steps": 350},
    }


def run_demo(workdir: str | Path, progress: Callable[[str], None] = print, port: int | None = None,
             settings: dict | None = None) -> dict:
    """Run the demo (resumable: a rerun continues from the ledger) and return where everything is.
    port: the managed Label Studio's port (our ML backend takes the next one), so two demos can run side by
    side; None: the config's (8089 / 9099). settings: dotted config keys written into a new work dir's
    engine.yaml on top of the demo's (e.g. {"stages.select": "uncertain"}: benchmarks/flywheel.py)."""

    t0 = time.monotonic()
    load_start = os.getloadavg()[0]
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for sub, n, seed, family in DEMO_DATA:
        if not (workdir / sub / "annotations.json").exists():
            progress(f"synthesising {n} {family} images into {workdir / sub}")
            write_synthetic_dataset(workdir / sub, n_images=n, seed=seed, size=DEMO_SIZE, family=family)
    config_path = workdir / "engine.yaml"
    if not config_path.exists():
        config = demo_config(workdir)
        for key, value in (settings or {}).items():
            set_dotted(config, key, value)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = load_config(config_path, None if port is None else {"labelstudio.port": port,
                                                               "labelstudio.ml_backend_port": port + 1})

    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    summary = run_rounds(cfg, progress=progress)

    store = runtime.mask_store(cfg)
    exports = {}
    for fmt in ("sa1b", "coco"):
        out = workdir / "exports" / fmt
        progress(f"exporting {fmt} -> {out}")
        exports[fmt] = export(fmt, store, str(out), runtime.image_source(cfg),
                              filters=ExportFilters(), overwrite=True)
    report = write_report(cfg)
    ls = cfg.labelstudio
    return {
        "workdir": str(workdir),
        "config": str(config_path),
        "store": cfg.path(cfg.storage.root),
        "exports": {fmt: str(workdir / "exports" / fmt) for fmt in exports},
        "export_masks": {fmt: e["masks"] for fmt, e in exports.items()},
        "report": report,
        "label_studio": f"http://127.0.0.1:{ls.port}" if ls.managed else ls.url,
        "final_checkpoint": summary["final_checkpoint"],
        "rounds": summary["rounds"],
        "auto": summary["auto"],
        "flywheel": json.loads((Path(report).parent / "rounds.json").read_text()),
        "minutes": round((time.monotonic() - t0) / 60, 1),
        "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)],
        "holdout": holdout_size(cfg),
    }


def format_demo_summary(result: dict) -> str:
    """What the demo prints at the end: the per-round tables (the report's rounds.json, each under 80 columns),
    then where to look."""
    load = result.get("load_average") or [None, None]
    hold = result.get("holdout") or {}
    lines = [f"demo finished in {result['minutes']} min (load average {_num(load[0], 1)} at the start, "
             f"{_num(load[1], 1)} at the end)", "",
             textwrap.fill(f"holdout ({_num(hold.get('images'), 0)} images, {_num(hold.get('masks'), 0)} masks): "
                           f"the round's retrained model, 1-click mIoU; interval: 95 % paired bootstrap of its "
                           f"difference to the model in use; general: that difference on the general holdout; "
                           f"steps: optimiser steps trained of those planned", 79), "",
             format_rounds_table(result.get("flywheel") or [])]
    auto = result.get("auto") or {}
    truth = auto.get("truth") or {}
    if truth.get("truth_masks") is not None:
        lines += ["", textwrap.fill(
            f"automatic stage: {auto.get('masks', 0)} masks on {auto.get('images', 0)} images against "
            f"{truth['truth_masks']} ground-truth masks: recall@0.5 {_num(truth.get('recall_50'))}, "
            f"precision@0.5 {_num(truth.get('precision_50'))}", 79)]
    lines += ["",
              f"  work dir       {result['workdir']}",
              f"  config         {result['config']}",
              "                 (sa-engine run --config … resumes / repeats it)",
              f"  mask shards    {result['store']}",
              f"  SA-1B export   {result['exports']['sa1b']}   ({result['export_masks']['sa1b']} masks)",
              f"  COCO export    {result['exports']['coco']}   ({result['export_masks']['coco']} masks)",
              f"  report         {result['report']}",
              "                 (per-round figures: rounds.json beside it)",
              f"  Label Studio   {result['label_studio']}",
              "                 (sa-engine labelstudio status --show-password shows the login)",
              f"  final model    {result['final_checkpoint']}"]
    return "\n".join(lines)


def _num(v, digits: int = 2) -> str:
    """A figure for the summary: '-' when there is none (no masks: no precision)."""
    return "-" if v is None else f"{v:.{digits}f}"
