"""`sa-engine`: the command line. Each command is a thin wrapper over a function in engine/ or stages/."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(help="A data engine for SA-1B-style segmentation datasets.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
stage_app = typer.Typer(help="Run one stage of one round.", no_args_is_help=True)
labelstudio_app = typer.Typer(help="The managed Label Studio server.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(labelstudio_app, name="labelstudio")
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback for errors the user can fix)."""
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def synth(out: Path = typer.Option(..., help="Output folder (images/ and annotations.json)."),
          images: int = typer.Option(16, help="Number of images."),
          seed: int = typer.Option(0, help="Seed; different seeds give disjoint hold-out splits."),
          size: int = typer.Option(256, help="Image side in pixels.")) -> None:
    """Write the embedded default data set: synthetic scenes with exact instance masks (COCO RLE)."""
    from engine.synth import write_synthetic_dataset

    summary = write_synthetic_dataset(out, n_images=images, seed=seed, size=size)
    console.print(summary)


@app.command("config")
def config_cmd(config: Optional[Path] = typer.Option(None, "--config", help="A YAML config to check."),
               print_defaults: bool = typer.Option(False, "--print-defaults",
                                                   help="Print every key with its default, as YAML."),
               reference: bool = typer.Option(False, "--reference", help="Print the key table of docs/config.md."),
               check: bool = typer.Option(False, "--check", help="Also check paths, S3, Label Studio and Ray."),
               address: Optional[str] = typer.Option(None, help="The Ray address the run will use.")) -> None:
    """Print the defaults, or validate a config file (one line per problem)."""
    from engine.config import ConfigError, config_reference_markdown, defaults_yaml, load_config, validate_for_run

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
    from engine.cluster import init_ray
    from engine.config import ConfigError, load_config, validate_for_run
    from engine.rounds import LedgerError, StepFailed, run_rounds

    try:
        cfg = load_config(config)
        validate_for_run(cfg, address=address)
    except ConfigError as e:
        fail(str(e))
    init_ray(address or cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    try:
        summary = run_rounds(cfg, progress=lambda msg: console.print(f"[cyan]engine[/cyan] {msg}", highlight=False))
    except (StepFailed, LedgerError) as e:
        fail(f"{e} (rerun the same command to resume)", code=1)
    except KeyboardInterrupt:
        fail("interrupted; the ledger keeps every finished step (rerun the same command to resume)", code=130)
    for r in summary["rounds"]:
        d = r.get("decision") or {}
        console.print(f"round {r['round']} ({r['stage']}): {r['images']} images; {d.get('reason', r.get('note', ''))}",
                      highlight=False)
    console.print(f"final model: {summary['final_checkpoint']}\nledger: {summary['ledger']}", highlight=False)


@app.command()
def report(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
           out: Optional[Path] = typer.Option(None, help="Output folder (default: <workdir>/report)."),
           gallery: int = typer.Option(8, help="Images in the overlay gallery.")) -> None:
    """Write the report (Markdown + PNG plots) from the ledger and the shards."""
    from engine.config import ConfigError, load_config
    from engine.report import ReportError, write_report

    try:
        cfg = load_config(config)
        path = write_report(cfg, out_dir=str(out) if out else None, gallery_images=gallery)
    except (ConfigError, ReportError) as e:
        fail(str(e))
    console.print(f"report: {path}", highlight=False)


def main() -> None:  # pragma: no cover - console entry for `python -m engine.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
