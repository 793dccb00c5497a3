"""A round's result on any machine (issue 30): the same short loop, run twice, gives the same figures.

The loop is the real one: a starting model bootstrapped on "shapes" scenes, a holdout carved from the user's
images and drawn by simulated annotators through the real Label Studio and our ML backend, two assisted-manual
rounds on "pebbles" scenes, retraining on Ray Train, a general holdout carved from the starting set, and the
promotion gate. It runs once alone, then again in a fresh work dir beside a process that keeps one core busy,
and compares every holdout figure of every round (metrics and per-mask IoUs, the general holdout's too), the
promotions and the optimiser steps each training made. Budgets are steps, so the second run takes longer and
must land on the same figures.

    .venv/bin/python benchmarks/reproducible.py [--port 8389] [--keep DIR]

Last line, JSON: max_abs_diff (over every holdout figure of every round), figures (how many), same_promotions,
steps_first, steps_second, holdout_masks and holdout_truth_masks (equal: the holdout drawn whole),
minutes_first, minutes_second, load_average_first, load_average_second.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from engine.integrations.cluster import init_ray  # noqa: E402
from engine.integrations.config import load_config  # noqa: E402
from engine.integrations.labelstudio import ServerSettings, start_server, stop_server  # noqa: E402
from engine.integrations.synth import write_synthetic_dataset  # noqa: E402
from engine.report import evaluation_figures  # noqa: E402
from engine.rounds import LEDGER_FILE, Ledger, run_rounds  # noqa: E402


def loop_config(workdir: Path, ls_url: str, token: str, backend_port: int) -> dict:
    return {
        "workdir": str(workdir), "seed": 0,
        "images": {"source": "data/images", "ground_truth": "data/annotations.json", "holdout_from_source": 4,
                   "holdout_source": None, "holdout_ground_truth": None},
        "model": {"bootstrap_steps": 200, "bootstrap_images": 32, "bootstrap_image_size": 128,
                  "bootstrap_family": "shapes", "bootstrap_general_holdout": 8},
        "stages": {"manual": {"rounds": 2, "images_per_round": 4}, "semi": {"rounds": 0}, "final_auto": "none"},
        "labelstudio": {"managed": False, "url": ls_url, "token": token, "ml_backend_port": backend_port},
        "train": {"steps": 120},
        "eval": {"max_objects": 200},
    }


def run_once(workdir: Path, ls_url: str, token: str, backend_port: int, label: str) -> dict:
    write_synthetic_dataset(workdir / "data", n_images=16, seed=0, size=128, family="pebbles")
    (workdir / "engine.yaml").write_text(yaml.safe_dump(loop_config(workdir, ls_url, token, backend_port)))
    cfg = load_config(workdir / "engine.yaml")
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    run_rounds(cfg, progress=lambda msg: print(f"{label} {msg}", flush=True))
    ledger = Ledger(workdir / LEDGER_FILE)
    hold = (ledger.get("r0.holdout") or {}).get("outputs") or {}
    return {**evaluation_figures(ledger), "minutes": round((time.monotonic() - t0) / 60, 2),
            "load_average": [round(load0, 1), round(os.getloadavg()[0], 1)],
            "holdout_masks": hold.get("masks"), "holdout_truth_masks": hold.get("truth_masks")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8389, help="Label Studio's port (the ML backends take the next two)")
    ap.add_argument("--keep", help="keep the two work dirs under this folder (default: a temporary one, removed)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sa-reproducible-"))
    root.mkdir(parents=True, exist_ok=True)
    server = start_server(ServerSettings(data_dir=root / "labelstudio", port=args.port, document_root=root),
                          log=lambda m: print(f"reproducible {m}", flush=True))
    init_ray("local")
    try:
        first = run_once(root / "alone", server.url, server.token, args.port + 1, "alone")
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one core kept busy
        try:
            second = run_once(root / "busy", server.url, server.token, args.port + 2, "busy")
        finally:
            burner.kill()
    finally:
        stop_server(root / "labelstudio")
    a, b = np.array(first["values"]), np.array(second["values"])
    figures = {
        "max_abs_diff": float(np.max(np.abs(a - b))) if len(a) == len(b) and len(a) else None,
        "figures": len(a), "same_figure_count": len(a) == len(b),
        "same_promotions": first["promotions"] == second["promotions"],
        "promotions": [p for _, p in first["promotions"]],
        "steps_first": first["steps"], "steps_second": second["steps"],
        "holdout_masks": first["holdout_masks"], "holdout_truth_masks": first["holdout_truth_masks"],
        "minutes_first": first["minutes"], "minutes_second": second["minutes"],
        "load_average_first": first["load_average"], "load_average_second": second["load_average"],
    }
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
