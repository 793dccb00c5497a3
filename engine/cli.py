"""`sa-engine`: the command line. Each command is a thin wrapper over a function in engine/ or stages/.

Commands import what they run inside their bodies on purpose: the stages pull in torch, Ray and pyarrow
(seconds of start-up), which `--help`, `config` and `labelstudio status` should not pay for.
"""
from __future__ import annotations

import json
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


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback for errors the user can fix)."""
    console.print(tagged("error:", "red", message))
    raise typer.Exit(code)


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


@app.command("export")
def export_cmd(fmt: str = typer.Option(..., "--format", help="sa1b (tars: one JSON per image beside the image), "
                                                            "coco (RLE), coco-polygons, yolo-seg, hf (Hugging Face "
                                                            "datasets) or webdataset (docs/exports.md)."),
               out: str = typer.Option(..., "--out", help="Output folder or s3://bucket/prefix."),
               config: Optional[Path] = typer.Option(None, "--config", help="Engine config: storage.root, "
                                                     "images.source, storage.s3_endpoint_url."),
               store: Optional[str] = typer.Option(None, "--store", help="The mask store (instead of storage.root)."),
               images: Optional[str] = typer.Option(None, "--images", help="The image source (instead of "
                                                    "images.source); every format but coco."),
               stage: Optional[list[str]] = typer.Option(None, "--stage", help="Only this stage (repeatable)."),
               rounds: Optional[str] = typer.Option(None, "--rounds", help="One round (2) or a range (1:3)."),
               verified_only: bool = typer.Option(False, "--verified-only", help="Only human-verified masks."),
               min_predicted_iou: Optional[float] = typer.Option(None, "--min-predicted-iou"),
               min_stability_score: Optional[float] = typer.Option(None, "--min-stability-score"),
               image_ids: Optional[Path] = typer.Option(None, "--image-ids", help="File: one image id a line."),
               split: Optional[str] = typer.Option(None, "--split", help="e.g. train=0.9,val=0.1 (stable hash "
                                                   "of the image id); default one split 'all'."),
               images_per_tar: Optional[int] = typer.Option(None, "--images-per-tar", help="sa1b / webdataset: "
                                                            "images per tar (1000); hf: images per file (500)."),
               tolerance_px: Optional[float] = typer.Option(None, "--tolerance-px", help="coco-polygons / yolo-seg: "
                                                            "polygon simplification in pixels (0.25)."),
               overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export."),
               s3_endpoint_url: Optional[str] = typer.Option(None, "--s3-endpoint-url")) -> None:
    """Export the masks in a trainer's format (SA-1B, COCO, YOLO, Hugging Face, WebDataset), filtered and split;
    prints a JSON summary."""
    from engine.integrations import runtime
    from engine.integrations.config import ConfigError, EngineConfig, load_config
    from storage.backend import StoreError
    from storage.exports import ExportError, ExportFilters, export, parse_rounds, parse_splits, read_image_ids

    def given(uri: Optional[str]) -> Optional[str]:  # a path on the command line is relative to here
        return uri if uri is None or "://" in uri else str(Path(uri).resolve())

    try:
        cfg = load_config(config) if config is not None else EngineConfig()
        if s3_endpoint_url:
            cfg.storage.s3_endpoint_url = s3_endpoint_url
        store_uri = given(store) or (cfg.path(cfg.storage.root) if config else None)
        images_uri = given(images) or (cfg.path(cfg.images.source) if config else None)
        if store_uri is None:
            fail("export: no mask store: pass --store URI or --config FILE")
        if fmt != "coco" and not fmt.startswith("coco-") and images_uri is None:
            fail(f"export --format {fmt}: no image source: pass --images URI or --config FILE")
        filters = ExportFilters(stage=tuple(stage) if stage else None, rounds=parse_rounds(rounds),
                                verified_only=verified_only, min_predicted_iou=min_predicted_iou,
                                min_stability_score=min_stability_score,
                                image_ids=read_image_ids(image_ids) if image_ids else None)
        source = runtime.image_source(cfg, images_uri) if images_uri else None
        summary = export(fmt, runtime.mask_store(cfg, store_uri), out, source, filters=filters,
                         splits=parse_splits(split), images_per_tar=images_per_tar, tolerance_px=tolerance_px,
                         overwrite=overwrite, **runtime.export_options(cfg))
    except (ConfigError, ExportError, StoreError) as e:
        fail(str(e), code=1)
    for skipped in summary.get("skipped", []):
        console.print(tagged("skipped", "yellow", f"{skipped['image_id']}: {skipped['reason']}"))
    console.print(f"{fmt} export: {summary['images']} images, {summary['masks']} masks -> {out}", highlight=False)
    sys.stdout.write(json.dumps(summary) + "\n")


@app.command("import")
def import_cmd(fmt: str = typer.Option(..., "--format", help="coco (RLE or polygons) or yolo-seg."),
               path: Path = typer.Argument(..., help="coco: the instances JSON; yolo-seg: the folder (data.yaml, "
                                                     "labels/)."),
               config: Path = typer.Option(..., "--config", help="The engine's YAML config: its store and images."),
               round_no: int = typer.Option(0, "--round", help="The round the imported masks belong to.")) -> None:
    """Bring earlier labels in as verified masks (origin "imported"): the labels' images must be in
    images.source; prints a JSON summary (a label whose image is not there is skipped with one line)."""
    from engine.integrations import runtime
    from engine.integrations.config import ConfigError, load_config
    from storage.backend import StoreError
    from storage.imports import import_coco, import_yolo

    if fmt not in ("coco", "yolo-seg"):
        fail(f"import --format {fmt}: expected coco or yolo-seg")
    try:
        cfg = load_config(config)
        store, source = runtime.mask_store(cfg), runtime.image_source(cfg)
        summary = (import_coco(store, source, path, round_no) if fmt == "coco"
                   else import_yolo(store, source, path, round_no))
    except (ConfigError, StoreError, ValueError, OSError) as e:
        fail(str(e).splitlines()[0], code=1)
    for skipped in summary["skipped"]:
        console.print(tagged("skipped", "yellow", f"{skipped['thing']}: {skipped['reason']}"))
    console.print(f"{fmt} import: {summary['masks']} masks on {summary['images']} images -> "
                  f"{cfg.path(cfg.storage.root)}", highlight=False)
    sys.stdout.write(json.dumps(summary) + "\n")


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


# ---- Label Studio, the ML backend, simulated annotators and the assisted-manual stage (issue 5)

def _ls_config(config: Optional[Path]):
    from engine.integrations.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        fail(str(e))


@labelstudio_app.command("up")
def labelstudio_up(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config.")) -> None:
    """Install (first use) and start the managed server on 127.0.0.1; harmless if it is up."""
    from engine.integrations.labelstudio import LabelStudioError, start_server
    from engine.integrations.runtime import server_settings

    cfg = _ls_config(config)
    if not cfg.labelstudio.managed:
        fail("labelstudio.managed is false: the engine uses the server at labelstudio.url; nothing to start")
    try:
        info = start_server(server_settings(cfg), log=lambda m: console.print(m, highlight=False))
    except LabelStudioError as e:
        fail(str(e), code=1)
    console.print(f"Label Studio up: {info.url} (pid {info.pid}, user {info.username}, data {info.data_dir})",
                  highlight=False)


@labelstudio_app.command("down")
def labelstudio_down(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config.")) -> None:
    """Stop the managed server (by its recorded PID)."""
    from engine.integrations.labelstudio import stop_server
    from engine.integrations.runtime import server_settings

    from engine.integrations.labelling import stop_ml_backend_service

    cfg = _ls_config(config)
    stopped = stop_server(server_settings(cfg).data_dir)
    console.print("Label Studio stopped" if stopped else "Label Studio was not running", highlight=False)
    if stop_ml_backend_service(cfg):
        console.print("ML backend service stopped", highlight=False)


@labelstudio_app.command("status")
def labelstudio_status(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                       show_password: bool = typer.Option(False, "--show-password",
                                                          help="Also print the admin password (text and JSON).")
                       ) -> None:
    """Print the managed server's status as JSON, with the URL and the login to open it with (exit 1 if it
    is not healthy). The password is printed only with --show-password; it is kept in the data dir's
    credentials.json (mode 600)."""
    from engine.integrations.labelstudio import is_installed, server_status, venv_dir
    from engine.integrations.runtime import server_settings

    settings = server_settings(_ls_config(config))
    st = server_status(settings.data_dir)
    st.update(installed=is_installed(), venv=str(venv_dir()), username=settings.username)
    creds = Path(settings.data_dir) / "credentials.json"  # mode 600, written at the first start
    st["credentials_file"] = str(creds)
    if show_password and creds.is_file():
        st["password"] = json.loads(creds.read_text()).get("password")
    if st["healthy"]:
        login = st["password"] if show_password else f"(password: --show-password, or {creds})"
        console.print(f"Label Studio {st['url']}: log in as {settings.username} / {login}", highlight=False,
                      markup=False)
    sys.stdout.write(json.dumps(st) + "\n")
    if not st["healthy"]:
        raise typer.Exit(1)


@app.command("ml-backend")
def ml_backend_cmd(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                   checkpoint: Optional[str] = typer.Option(None, help="Model checkpoint (default: model.checkpoint, "
                                                                       "else a fresh model.preset model)."),
                   host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless --allow-remote)."),
                   allow_remote: bool = typer.Option(False, "--allow-remote", help="Serve other machines (e.g. "
                                                     "--host 0.0.0.0 in a container); the token guards every request."),
                   port: Optional[int] = typer.Option(None, help="Port (default: labelstudio.ml_backend_port)."),
                   threads: int = typer.Option(1, help="torch CPU threads (a click is one small decoder pass; "
                                                       "more threads mostly add contention)."),
                   follow: bool = typer.Option(True, "--follow/--no-follow", help="Switch to each newly promoted "
                                               "model without a restart (<workdir>/models/current.json)."),
                   poll_s: float = typer.Option(5.0, "--poll-s", help="How often to look for a newly promoted model.")) -> None:
    """Serve our Label Studio ML backend in the foreground, as long as Label Studio runs: the model in use (the
    round loop's promoted one; --checkpoint to start from another), switched without a restart when a round
    promotes a new one. Stages use it when it runs. Credentials: user sa-engine + the backend token."""
    import torch

    from engine.integrations import runtime
    from engine.integrations.labelling import concept_predictor
    from engine.integrations.ml_backend import (
        BackendState,
        EmbeddingCache,
        MaskPredictor,
        MLBackend,
        ModelFollower,
        source_image_loader,
    )
    from model.checkpoints import CheckpointError

    torch.set_num_threads(max(1, threads))
    cfg = _ls_config(config)
    try:
        seg = runtime.segmenter(cfg, checkpoint or runtime.current_model(cfg))
        embeddings = cfg.path("embeddings")
        state = BackendState(MaskPredictor(seg, EmbeddingCache(seg, precomputed_dir=embeddings)),
                             token=runtime.ml_backend_token(cfg), image_loader=None, concept=concept_predictor(cfg))
        state.image_loader = source_image_loader(runtime.image_source(cfg), runtime.labelstudio_url(cfg), state)
        server = MLBackend(state, host, cfg.labelstudio.ml_backend_port if port is None else port, allow_remote)
    except (ValueError, OSError, CheckpointError) as e:
        fail(f"ml-backend: {e}")
    say = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    follower = ModelFollower(state, lambda: runtime.current_model(cfg), lambda ck: runtime.segmenter(cfg, ck),
                             embeddings, every=poll_s, log=say).start() if follow else None
    say(f"ML backend {server.url} (model {seg.model_version}{', following the promoted model' if follow else ''}); "
        f"basic auth user sa-engine, password in {cfg.path('labelstudio')}/ml_backend_token or "
        "labelstudio.ml_backend_token")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    finally:
        if follower is not None:
            follower.stop()


@app.command("annotate")
def annotate_cmd(project: str = typer.Option(..., "--project", help="Label Studio project id or title."),
                 simulate: bool = typer.Option(False, "--simulate", help="Use a simulated annotator (required)."),
                 config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                 checkpoint: Optional[str] = typer.Option(None, help="Model the ML backend serves."),
                 annotator: str = typer.Option("sim-annotator-1", help="Annotator name (a Label Studio user)."),
                 via: str = typer.Option("labelstudio", help="labelstudio: clicks go through Label Studio's "
                                                             "interactive endpoint; backend: straight to ours.")) -> None:
    """Annotate a project's open tasks with a simulated annotator through the real Label Studio API."""
    from engine.integrations.labelling import annotate_project
    from engine.integrations.labelstudio import LabelStudioError

    if not simulate:
        fail("annotate: only --simulate is supported (people annotate in the Label Studio UI)")
    try:
        summary = annotate_project(_ls_config(config), project, checkpoint, annotator, via)
    except (LabelStudioError, ValueError) as e:
        fail(str(e), code=1)
    sys.stdout.write(json.dumps(summary) + "\n")


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

    cfg = _ls_config(config)
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


# ---- the quarantine, the store's integrity, garbage (issue 17)

@quarantine_app.command("list")
def quarantine_list(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
                    stage: Optional[str] = typer.Option(None, help="Only this stage's entries.")) -> None:
    """What is set aside now: one line each (held: a rerun skips it; retrying: a rerun tries it again),
    then the entries as JSON."""
    from engine.integrations import runtime

    cfg = _ls_config(config)
    rows = [e for e in runtime.quarantine(cfg).status() if stage is None or e.get("stage") == stage]
    for e in rows:
        state = "held" if e["held"] else f"retrying ({e['attempts']}/{cfg.images.transient_retries})"
        console.print(f"{e['stage']:<6} {e['kind']:<9} {state:<14} {e['thing']}: {e['reason']}", highlight=False)
    console.print(f"{len(rows)} set aside ({sum(e['held'] for e in rows)} held)", highlight=False)
    sys.stdout.write(json.dumps(rows) + "\n")


@quarantine_app.command("release")
def quarantine_release(things: Optional[list[str]] = typer.Argument(None, help="The things to release, as "
                                                                           "`quarantine list` names them."),
                       config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
                       stage: Optional[str] = typer.Option(None, help="Only this stage's entries."),
                       release_all: bool = typer.Option(False, "--all", help="Release every entry (of --stage).")) -> None:
    """Let set-aside things through again: the next run of their stage tries them."""
    from engine.integrations import runtime

    if not things and not release_all:
        fail("quarantine release: name the things to release, or pass --all")
    cfg = _ls_config(config)
    released = runtime.quarantine(cfg).release(None if release_all else list(things), stage=stage)
    unknown = sorted(set(things or []) - {e["thing"] for e in released})
    for thing in unknown:
        console.print(tagged("not set aside:", "yellow", thing))
    console.print(f"released {len(released)}", highlight=False)
    sys.stdout.write(json.dumps(released) + "\n")
    if unknown:
        raise typer.Exit(1)


def _store_for(config: Optional[Path], store: Optional[str]):
    """(config, MaskStore) from --config or --store."""
    from engine.integrations import runtime
    from engine.integrations.config import EngineConfig

    cfg = _ls_config(config) if config is not None else EngineConfig()
    if store is None and config is None:
        fail("pass --config FILE or --store URI")
    uri = store if store is None or "://" in store else str(Path(store).resolve())
    return cfg, runtime.mask_store(cfg, uri)


@store_app.command("verify")
def store_verify(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                 store: Optional[str] = typer.Option(None, "--store", help="The mask store (instead of storage.root)."),
                 deep: bool = typer.Option(False, "--deep", help="Also decode every RLE and check its size, area and "
                                                                 "(with --config) its image's size."),
                 limit: int = typer.Option(100, help="Report at most this many bad rows.")) -> None:
    """Check every committed file against the manifest's checksums (and, --deep, every row). Exit 1 on a problem."""
    from engine.integrations import runtime
    from storage.backend import StoreError
    from storage.images import image_size

    cfg, mask_store = _store_for(config, store)
    try:
        if not deep:
            mask_store.verify()
            problems = []
        else:
            source = runtime.image_source(cfg) if config is not None else None
            problems = mask_store.verify_deep(
                None if source is None else (lambda image_id: image_size(source, image_id)), limit=limit)
    except StoreError as e:
        fail(str(e), code=1)
    for line in problems:
        console.print(tagged("bad row:", "red", line))
    manifest = mask_store.manifest()
    sys.stdout.write(json.dumps({"shards": len(manifest.shards), "rows": sum(x.rows for x in manifest.shards),
                                 "deep": deep, "problems": problems}) + "\n")
    if problems:
        raise typer.Exit(1)


@store_app.command("rebuild-manifest")
def store_rebuild_manifest(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                           store: Optional[str] = typer.Option(None, "--store", help="The mask store."),
                           dry_run: bool = typer.Option(False, "--dry-run", help="Say what it would do; write nothing.")) -> None:
    """Recover a lost or damaged manifest from the shard files on disk (finished commits only; the old
    manifest is kept beside as manifest.json.damaged-*)."""
    from storage.backend import StoreError

    _, mask_store = _store_for(config, store)
    try:
        summary = mask_store.rebuild_manifest(dry_run=dry_run)
    except StoreError as e:
        fail(str(e), code=1)
    for item in summary["left_out"]:
        console.print(tagged("left out", "yellow", f"{item['path']}: {item['reason']}"))
    console.print(f"manifest {'would list' if dry_run else 'rebuilt:'} {summary['shards']} shards, "
                  f"{summary['rows']} masks", highlight=False)
    sys.stdout.write(json.dumps(summary) + "\n")


@store_app.command("compact")
def store_compact(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                  store: Optional[str] = typer.Option(None, "--store", help="The mask store."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Say what it would do; write nothing.")) -> None:
    """Merge many small shards (under a quarter of storage.shard_target_mb) into few of about the target size,
    per stage, round and model; the masks, their ids and lineage are unchanged. Safe while stages run."""
    from storage.backend import StoreError

    _, mask_store = _store_for(config, store)
    try:
        summary = mask_store.compact(dry_run=dry_run)
    except StoreError as e:
        fail(str(e), code=1)
    console.print(f"{summary['shards_before']} shards -> {summary['shards_after']}"
                  f"{' (dry run)' if dry_run else ''}", highlight=False)
    sys.stdout.write(json.dumps(summary) + "\n")


@app.command("gc")
def gc_cmd(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
           export_out: Optional[list[str]] = typer.Option(None, "--export", help="Also clean what killed exports to "
                                                                              "this output left (repeatable)."),
           min_age_hours: float = typer.Option(1.0, "--min-age-hours", help="Leave younger files: they may belong "
                                                                            "to a writer that is still running.")) -> None:
    """Remove orphans: shard files no commit finished, half-written temporary files, staging folders of killed
    exports and checkpoint saves."""
    from engine.integrations import runtime
    from model.checkpoints import collect_checkpoint_garbage
    from storage.backend import StoreError
    from storage.exports import collect_export_garbage

    cfg = _ls_config(config)
    age = min_age_hours * 3600
    try:
        deleted = runtime.mask_store(cfg).collect_garbage(min_age_s=age)
    except StoreError as e:
        fail(str(e), code=1)
    for out in export_out or []:
        deleted += collect_export_garbage(out, min_age_s=age)
    deleted += collect_checkpoint_garbage(cfg.path("models"), min_age_s=age)
    for path in deleted:
        console.print(f"removed {path}", highlight=False)
    console.print(f"gc: removed {len(deleted)}", highlight=False)
    sys.stdout.write(json.dumps({"removed": deleted}) + "\n")


def main() -> None:  # pragma: no cover - console entry for `python -m engine.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
