"""`sa-engine stage …`: one stage of one round (Ray stages and Label Studio stages)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from engine.cli import EXIT_NO_MASKS, console, end, fail, read_config, stage_app, tagged


@stage_app.command("auto")
def stage_auto(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
               round_no: int = typer.Option(1, "--round", help="The round these masks belong to."),
               checkpoint: Optional[str] = typer.Option(None, help="Model checkpoint (default: model.checkpoint, "
                                                                   "else a fresh model.preset model)."),
               address: Optional[str] = typer.Option(None, help="Ray address (default: ray.address).")) -> None:
    """Fully automatic stage: grid-prompted masks for every image not yet done for this model (resumable)."""
    from stages.auto import run_auto_stage

    summary = _run_ray_stage(config, address, "auto", lambda cfg: run_auto_stage(cfg, round_no, checkpoint))
    end([summary])


def _run_ray_stage(config: Path, address: Optional[str], stage: str, run) -> dict:
    """Read and check the config for `stage`, start Ray, `run(cfg)`; print the summary and its warnings, exit 3
    when there were no images at all. Bad config, checkpoint or input: one line, exit 2."""
    from engine.integrations.cluster import init_ray
    from engine.integrations.config import ConfigError, load_config, validate_for_run
    from model.checkpoints import CheckpointError
    from storage.backend import StoreError

    try:
        cfg = load_config(config)
        validate_for_run(cfg, address=address, stage=stage)
        init_ray(address or cfg.ray.address, num_cpus=cfg.ray.num_cpus)
        summary = run(cfg).to_dict()
    except (ConfigError, CheckpointError, ValueError) as e:
        fail(str(e))
    except StoreError as e:
        fail(str(e), code=1)
    except KeyboardInterrupt:
        fail("interrupted; committed images are kept (rerun the same command to resume)", code=130)
    sys.stdout.write(json.dumps(summary) + "\n")
    if summary.get("set_aside"):
        console.print(tagged("warning:", "yellow", f"{summary['set_aside']} image(s) held in the quarantine were "
                      "skipped (`sa-engine quarantine list --config ...`)"))
    if summary.get("images", 0) + summary.get("already_done", 0) + summary.get("set_aside", 0) + \
            summary.get("quarantined", 0) == 0:
        console.print("[yellow]warning:[/yellow] no images under images.source: nothing done", highlight=False)
        raise typer.Exit(EXIT_NO_MASKS)
    return summary


@stage_app.command("concept")
def stage_concept(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
                  phrases: Path = typer.Option(..., "--phrases", help="Noun phrases, one per line."),
                  round_no: int = typer.Option(0, "--round", help="The round these masks belong to."),
                  address: Optional[str] = typer.Option(None, help="Ray address (default: ray.address).")) -> None:
    """Concept stage (SAM 3): every instance of each noun phrase in every image (stages.concept.checkpoint)."""
    from stages.concept import read_phrases, run_concept_stage

    try:
        wanted = read_phrases(phrases)  # before anything starts
    except ValueError as e:
        fail(str(e))
    _run_ray_stage(config, address, "concept", lambda cfg: run_concept_stage(cfg, wanted, round_no))


@stage_app.command("manual")
def stage_manual(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
                 round_no: int = typer.Option(1, "--round", help="The round."),
                 checkpoint: Optional[str] = typer.Option(None, help="Model checkpoint (default: model.checkpoint, "
                                                                     "else a fresh model.preset model)."),
                 simulate: Optional[bool] = typer.Option(None, "--simulate/--people",
                                                         help="Simulated annotators (default: stages.simulate).")) -> None:
    """Assisted-manual stage: server + ML backend, the round's project and tasks, annotation, pull-back."""
    from stages.manual import run_manual_stage

    _run_labelstudio_stage(run_manual_stage, config, round_no, checkpoint, simulate)


@stage_app.command("semi")
def stage_semi(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
               round_no: int = typer.Option(1, "--round", help="The round."),
               checkpoint: Optional[str] = typer.Option(None, help="Model checkpoint (default: model.checkpoint, "
                                                                   "else a fresh model.preset model)."),
               simulate: Optional[bool] = typer.Option(None, "--simulate/--people",
                                                       help="Simulated annotators (default: stages.simulate).")) -> None:
    """Semi-automatic stage: calibrated confident masks pre-filled in Label Studio, annotators add the rest."""
    from stages.semi import run_semi_stage

    _run_labelstudio_stage(run_semi_stage, config, round_no, checkpoint, simulate)


def _run_labelstudio_stage(run_stage, config: Path, round_no: int, checkpoint: Optional[str],
                           simulate: Optional[bool]) -> None:
    """Run a Label Studio stage (manual or semi) and print its summary as JSON; user errors as one line."""
    from engine.integrations.labelstudio import LabelStudioError
    from model.checkpoints import CheckpointError

    from engine.integrations.config import ConfigError, validate_for_run
    from storage.backend import StoreError

    cfg = read_config(config)
    simulate = cfg.stages.simulate if simulate is None else simulate
    try:  # before Label Studio starts or a project is made: nothing half-made is left behind
        validate_for_run(cfg, stage=run_stage.__module__.rsplit(".", 1)[-1], simulate=simulate)
    except ConfigError as e:
        fail(str(e))
    try:
        summary = run_stage(cfg, round_no, checkpoint, simulate=simulate).to_dict()
    except (LabelStudioError, CheckpointError, StoreError) as e:
        fail(str(e), code=1)
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    end([dict(summary, stage=run_stage.__module__.rsplit(".", 1)[-1])])


@stage_app.command("review")
def stage_review(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
                 round_no: int = typer.Option(..., "--round", help="The round whose doubted masks go to review."),
                 checkpoint: Optional[str] = typer.Option(None, help="Model the ML backend serves (default: "
                                                                     "model.checkpoint, else a fresh model)."),
                 simulate: Optional[bool] = typer.Option(None, "--simulate/--people",
                                                         help="Simulated reviewers (default: stages.simulate).")) -> None:
    """Review queue: the round's masks the engine doubts (audit picks, failed audits, low predicted IoU) go back
    to people; their accept / fix / reject decisions go into the lineage."""
    from stages.review import run_review_stage

    _run_labelstudio_stage(run_review_stage, config, round_no, checkpoint, simulate)
