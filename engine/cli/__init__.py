"""`sa-engine`: the command line. Each command is a thin wrapper over a function in engine/ or stages/.

Commands import what they run inside their bodies on purpose: the stages pull in torch, Ray and pyarrow
(seconds of start-up), which `--help`, `config` and `labelstudio status` should not pay for.
"""
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
quarantine_app = typer.Typer(help="Inputs set aside by the stages: list them, release them.", no_args_is_help=True)
store_app = typer.Typer(help="The mask store: check it, recover its manifest.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(labelstudio_app, name="labelstudio")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(store_app, name="store")
# No markup and no highlighting: user text (file names, config values, reasons) is printed as it is — a path
# holding "[/red]" must not raise or restyle. Our own tags are coloured by `tagged`.
console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)  # a one-line error stays one line


def tagged(tag: str, style: str, text: str):
    """`tag` in `style`, then `text` exactly as given (a Rich Text: nothing in it is read as markup)."""
    from rich.text import Text

    return Text.assemble((tag, style), " ", str(text))


# Exit statuses (README "Exit statuses"): what a script driving the engine can tell apart.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_MASKS, EXIT_MISSED_TARGET = 0, 1, 2, 3, 4


def ending_problems(summaries: list[dict]) -> tuple[int, list[str]]:
    """(exit status, one line each) for finished stage summaries that did not deliver. A line for each stage
    that processed images and wrote 0 masks, and for each semi round whose measured prefill precision missed its
    target. Status: EXIT_NO_MASKS when no stage wrote a mask at all, else EXIT_MISSED_TARGET when a target was
    missed, else EXIT_OK (one stage of a run writing nothing is a warning, not the run's failure)."""
    lines, missed = [], False
    for s in summaries:
        where = f"{s.get('stage', 'stage')} round {s.get('round')}"
        if s.get("images") and "masks" in s and not s["masks"]:
            untrained = "-init-" in str(s.get("model_version") or "")  # Segmenter.new names a fresh model so
            hint = ""
            if s.get("stage") == "auto" and untrained:
                hint = ("; the model is fresh and untrained (model.checkpoint is unset): point model.checkpoint at "
                        "SAM weights (docs/models.md) or train it in rounds (`sa-engine run`) first")
            elif s.get("stage") == "manual" and s.get("simulated") is None:
                hint = "; nobody submitted an annotation: annotate the project's tasks, then rerun to pull them"
            lines.append(f"{where}: {s['images']} image(s) processed, 0 masks written"
                         + (f" (filters: {s['thresholds']})" if s.get("thresholds") else "") + hint)
        precision, target = s.get("prefill_precision"), s.get("target_precision")
        if precision is not None and target is not None and precision < target:
            lines.append(f"{where}: prefill precision {precision:.3f} missed its target {target:.3f} "
                         "(stages.semi.target_precision); the next round recalibrates on these decisions")
            missed = True
    writers = [s for s in summaries if "masks" in s]  # (a review writes decisions, not masks)
    if any(s.get("images") for s in writers) and not any(s.get("masks") for s in writers):
        return EXIT_NO_MASKS, lines
    return (EXIT_MISSED_TARGET if missed else EXIT_OK), lines


def end(summaries: list[dict]) -> None:
    """Print the ending's warnings, one line each, and exit with its status (0 when all delivered)."""
    code, lines = ending_problems(summaries)
    for line in lines:
        console.print(tagged("warning:", "yellow", line))
    if code:
        raise typer.Exit(code)


def _show_progress_logs() -> None:
    """The engine's INFO lines (Label Studio installing and starting, the ML backend service, the stages) on
    stderr, so a long first start is not silence. Once per process."""
    import logging

    class StderrLines(logging.Handler):  # whatever sys.stderr is at the time (test runners swap it)
        def emit(self, record: logging.LogRecord) -> None:
            try:
                sys.stderr.write(self.format(record) + "\n")
            except (OSError, ValueError):
                self.handleError(record)

    for name in ("engine", "stages", "sa_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, StderrLines) or type(h).__name__ == "StderrLines" for h in logger.handlers):
            logger.addHandler(StderrLines())
            logger.setLevel(logging.INFO)


@app.callback()
def _main() -> None:
    _show_progress_logs()


def read_config(config: Optional[Path]):
    """The config file, or one line and exit 2 when it is not a valid config."""
    from engine.integrations.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        fail(str(e))


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback for errors the user can fix)."""
    console.print(tagged("error:", "red", message))
    raise typer.Exit(code)


# ---- Label Studio, the ML backend, simulated annotators and the assisted-manual stage (issue 5)


# ---- the quarantine, the store's integrity, garbage (issue 17)


def main() -> None:  # pragma: no cover - console entry for `python -m engine.cli`
    app()


# The commands, one module per area; imported last, they register themselves on the apps above.
from engine.cli import run, data, stages, people  # noqa: E402,F401,I001 (the order of --help)
