"""The flywheel (issue 23): does each round make the model better and the next round cheaper?

Runs the demo's round loop (engine/demo.py: the starting model bootstrapped on "shapes" scenes, the rounds
annotating "pebbles" scenes it has not seen, simulated annotators clicking through the real Label Studio and
our ML backend, retraining on Ray Train, the promotion gate, then the automatic stage) in a fresh work dir, and
prints the report's per-round figures (`<workdir>/report/rounds.json`) as a table, then one JSON line:
miou_round0, miou_final, miou_gain, clicks_first, clicks_last, clicks_ratio (first / last annotated round),
auto_recall_50, auto_precision_50, promotions, noise_promotions (promoted with an interval that includes 0),
general_drop (largest fall on the general holdout of a promoted model), select, minutes, load_average.

    .venv/bin/python benchmarks/flywheel.py                          # the demo's settings
    .venv/bin/python benchmarks/flywheel.py --select uncertain --port 8189
    .venv/bin/python benchmarks/flywheel.py --set train.include_bootstrap=false --workdir /tmp/fw-noreplay

Training budgets are optimiser steps, so the models do not depend on the machine's load (printed beside the
figures; benchmarks/reproducible.py checks it); the minutes do.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.demo import run_demo  # noqa: E402
from engine.integrations.config import load_config  # noqa: E402
from engine.integrations.labelstudio import stop_server  # noqa: E402
from engine.integrations.runtime import server_settings  # noqa: E402
from engine.report import format_rounds_table  # noqa: E402


def summarise(rows: list[dict], minutes: float) -> dict:
    """The issue's figures from rounds.json rows."""
    start = next((r for r in rows if r["round"] == 0), None)
    annotated = [r for r in rows if r["stage"] in ("manual", "semi") and r.get("clicks_per_mask") is not None]
    trained = [r for r in rows if r["stage"] in ("manual", "semi")]
    auto = next((r for r in rows if r["stage"] == "auto"), {})
    final = trained[-1]["in_use"] if trained else (start or {}).get("in_use")
    promoted = [r for r in trained if r.get("promoted")]
    first, last = (annotated[0]["clicks_per_mask"], annotated[-1]["clicks_per_mask"]) if annotated else (None, None)
    drops = [-r["general_delta"] for r in promoted if r.get("general_delta") is not None]
    return {
        "miou_round0": start and start["in_use"], "miou_final": final,
        "miou_gain": None if start is None or final is None else round(final - start["in_use"], 4),
        "clicks_first": first, "clicks_last": last,
        "clicks_ratio": round(first / last, 3) if first and last else None,
        "auto_recall_50": auto.get("auto_recall_50"), "auto_precision_50": auto.get("auto_precision_50"),
        "promotions": len(promoted),
        "noise_promotions": sum(1 for r in promoted if r.get("interval") and r["interval"][0] <= 0),
        "general_drop": round(max(drops), 4) if drops else None,
        "minutes": round(minutes, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="work dir (default: a fresh temporary one, removed afterwards)")
    ap.add_argument("--select", choices=("random", "uncertain"), default=None,
                    help="how rounds choose their images (default: the demo's)")
    ap.add_argument("--port", type=int, default=8189, help="Label Studio's port (the ML backend takes the next)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config keys (dotted, values as YAML/JSON scalars)")
    args = ap.parse_args()

    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    if args.select:
        settings["stages.select"] = args.select
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sa-flywheel-"))
    t0 = time.monotonic()
    try:
        result = run_demo(workdir, progress=lambda msg: print(f"flywheel {msg}", flush=True), port=args.port,
                          settings=settings)
    finally:
        config = workdir / "engine.yaml"
        if config.exists():
            stop_server(server_settings(load_config(config)).data_dir)
    minutes = (time.monotonic() - t0) / 60
    rows = result["flywheel"]
    print(format_rounds_table(rows))
    figures = summarise(rows, minutes)
    cfg = load_config(workdir / "engine.yaml")
    figures.update(select=cfg.stages.select, settings=settings, load_average=round(os.getloadavg()[0], 2),
                   workdir=str(workdir) if args.workdir else None)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
