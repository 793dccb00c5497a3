"""`sa-engine` commands that run the engine: synth, demo, config, run, report, eval, train."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from engine.cli import app, console, end, fail, tagged


@app.command()
def synth(out: Path = typer.Option(..., help="Output folder (images/ and annotations.json)."),
          images: int = typer.Option(16, help="Number of images."),
          seed: int = typer.Option(0, help="Seed; different seeds give disjoint hold-out splits."),
          size: int = typer.Option(256, help="Image side in pixels."),
          family: str = typer.Option("shapes", help="Scene family: shapes (few large vivid objects) or pebbles "
                                                    "(many small dull touching ones).")) -> None:
    """Write the embedded default data set: synthetic scenes with exact instance masks (COCO RLE)."""
    from engine.integrations.synth import write_synthetic_dataset

    try:
        summary = write_synthetic_dataset(out, n_images=images, seed=seed, size=size, family=family)
    except (ValueError, OSError) as e:
        fail(str(e))
    console.print(summary)


@app.command()
def demo(workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="Everything the demo writes goes here."),
         port: Optional[int] = typer.Option(None, "--port", min=1024, max=65534,
                                            help="Label Studio's port (the ML backend takes the next one); "
                                                 "default 8089.")) -> None:
    """The whole engine from nothing on the embedded synthetic data: Label Studio with simulated annotators,
    2 manual rounds, 1 semi round, the automatic stage, retraining between rounds, exports and the report.
    Rerunning resumes from the ledger."""
    from engine.demo import format_demo_summary, run_demo
    from engine.rounds import LedgerError, StepFailed

    try:
        result = run_demo(workdir, progress=lambda msg: console.print(tagged("demo", "cyan", msg)),
                          port=port)
    except (StepFailed, LedgerError) as e:
        fail(f"{e} (rerun the same command to resume)", code=1)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume", code=130)
    console.print(format_demo_summary(result), highlight=False)


@app.command("config")
def config_cmd(config: Optional[Path] = typer.Option(None, "--config", help="A YAML config to check."),
               print_defaults: bool = typer.Option(False, "--print-defaults",
                                                   help="Print every key with its default, as YAML."),
               reference: bool = typer.Option(False, "--reference", help="Print the key table of docs/config.md."),
               check: bool = typer.Option(False, "--check", help="Also check paths, S3, Label Studio and Ray."),
               address: Optional[str] = typer.Option(None, help="The Ray address the run will use.")) -> None:
    """Print the defaults, or validate a config file (one line per problem)."""
    from engine.integrations.config import (
        ConfigError,
        config_reference_markdown,
        defaults_yaml,
        load_config,
        validate_for_run,
    )

    if print_defaults:
        sys.stdout.write(defaults_yaml())
        return
    if reference:
        sys.stdout.write(config_reference_markdown())
        return
    try:
        cfg = load_config(config)
        if check:
            validate_for_run(cfg, address=address)
    except ConfigError as e:
        fail(str(e))
    console.print(f"{config or '<defaults>'}: ok" + ("" if check else " (types only; --check for the rest)"))


@app.command()
def run(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
        address: Optional[str] = typer.Option(None, help="Ray address: local, auto, ray://host:port "
                                                         "(default: ray.address from the config).")) -> None:
    """Run the data engine (manual rounds, semi rounds, automatic stage), resuming from its ledger."""
    from engine.integrations.cluster import init_ray
    from engine.integrations.config import ConfigError, load_config, validate_for_run
    from engine.rounds import LedgerError, StepFailed, run_rounds

    try:
        cfg = load_config(config)
        validate_for_run(cfg, address=address)
    except ConfigError as e:
        fail(str(e))
    init_ray(address or cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    try:
        summary = run_rounds(cfg, progress=lambda msg: console.print(tagged("engine", "cyan", msg)))
    except (StepFailed, LedgerError) as e:
        fail(f"{e} (rerun the same command to resume)", code=1)
    except KeyboardInterrupt:
        fail("interrupted; the ledger keeps every finished step (rerun the same command to resume)", code=130)
    for r in summary["rounds"]:
        d = r.get("decision") or {}
        console.print(f"round {r['round']} ({r['stage']}): {r['images']} images; {d.get('reason', r.get('note', ''))}",
                      highlight=False)
    console.print(f"final model: {summary['final_checkpoint']}\nledger: {summary['ledger']}", highlight=False)
    stages = [dict(r.get("summary") or {}, stage=r["stage"], round=r["round"]) for r in summary["rounds"]
              if r.get("summary")] + ([summary["auto"]] if summary.get("auto") else [])
    end(stages)


@app.command()
def report(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
           out: Optional[Path] = typer.Option(None, help="Output folder (default: <workdir>/report)."),
           gallery: int = typer.Option(8, help="Images in the overlay gallery.")) -> None:
    """Write the report (Markdown + PNG plots) from the ledger and the shards."""
    from engine.integrations.config import ConfigError, load_config
    from engine.report import ReportError, write_report

    try:
        cfg = load_config(config)
        path = write_report(cfg, out_dir=str(out) if out else None, gallery_images=gallery)
    except (ConfigError, ReportError) as e:
        fail(str(e))
    console.print(f"report: {path}", highlight=False)


@app.command("eval")
def eval_cmd(checkpoint: str = typer.Option(..., help="Model: our checkpoint dir, a transformers SAM dir, a Meta .pth, "
                                                      "or 'compact' for an untrained compact model."),
             data: Path = typer.Option(..., help="A folder with images/ and annotations.json (COCO RLE), e.g. from `sa-engine synth`."),
             clicks: int = typer.Option(5, help="Clicks per object in the point protocol."),
             max_objects: Optional[int] = typer.Option(None, help="Evaluate at most this many ground-truth masks."),
             amg: bool = typer.Option(True, "--amg/--no-amg", help="Also score automatic masks with COCOeval AP/AR."),
             points_per_side: int = typer.Option(16, help="Automatic mask generation grid (with --amg)."),
             pred_iou_thresh: float = typer.Option(0.5, help="AMG predicted-IoU filter before AP/AR (the round "
                                                             "loop's holdout evaluation and the report use 0.5 too; "
                                                             "SAM's 0.88 keeps nothing of a young model)."),
             stability_score_thresh: float = typer.Option(0.8, help="AMG stability-score filter before AP/AR (as "
                                                                    "the round loop and the report; SAM's: 0.95).")) -> None:
    """Evaluate a model: mIoU at 1..N clicks (SAM's protocol), box mIoU, and automatic-mask AP/AR."""
    from model.checkpoints import CheckpointError
    from model.evaluate import EVAL_PRED_IOU_THRESH, EVAL_STABILITY_SCORE_THRESH, evaluate_folder

    if amg and (pred_iou_thresh, stability_score_thresh) != (EVAL_PRED_IOU_THRESH, EVAL_STABILITY_SCORE_THRESH):
        console.print(f"note: AP/AR at predicted IoU >= {pred_iou_thresh:g}, stability >= {stability_score_thresh:g}; "
                      f"the round loop and the report use {EVAL_PRED_IOU_THRESH:g} / {EVAL_STABILITY_SCORE_THRESH:g}, "
                      "so the figures differ", highlight=False)

    try:
        table = evaluate_folder(checkpoint, str(data), clicks=clicks, max_objects=max_objects,
                                amg_points_per_side=points_per_side if amg else None,
                                pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    for key, value in table.items():
        sys.stdout.write(f"{key:<16} {value:.4f}\n" if isinstance(value, float) else f"{key:<16} {value}\n")
    sys.stdout.write(json.dumps(table) + "\n")


@app.command("train")
def train_cmd(out: Path = typer.Option(..., help="Checkpoint directory to write (safetensors + sa_engine.json)."),
              init: str = typer.Option("compact", "--init", help="A preset (compact, sam-vit-b, sam2.1-hiera-tiny, …: from scratch) or a checkpoint to fine-tune."),
              data: Optional[Path] = typer.Option(None, help="A synth-style folder (images/ + annotations.json); "
                                                           "default: fresh synthetic scenes."),
              steps: int = typer.Option(400, min=1, help="Training budget: optimiser steps (the same model on any "
                                                          "machine)."),
              minutes: Optional[float] = typer.Option(None, help="Optional wall-clock guard: stop earlier after "
                                                                 "this many minutes (reported as short)."),
              round_no: int = typer.Option(0, "--round", help="Round number recorded in the checkpoint."),
              use_ray: bool = typer.Option(False, "--ray/--no-ray", help="Run as a Ray Train TorchTrainer."),
              workers: int = typer.Option(1, help="Ray Train workers (with --ray)."),
              seed: int = typer.Option(0, help="Seed.")) -> None:
    """Train the segmenter with SAM's interactive recipe and write a checkpoint."""
    from engine.retrain import train_cli
    from model.checkpoints import CheckpointError

    try:
        summary = train_cli(out, init, None if data is None else str(data), steps, minutes, round_no, use_ray,
                            workers, seed)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    sys.stdout.write(json.dumps(summary) + "\n")
