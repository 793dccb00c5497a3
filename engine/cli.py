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


def main() -> None:  # pragma: no cover - console entry for `python -m engine.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
