"""`sa-engine` commands for the people path: the managed Label Studio, the ML backend, annotate."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from engine.cli import app, console, fail, labelstudio_app, read_config


@labelstudio_app.command("up")
def labelstudio_up(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config.")) -> None:
    """Install (first use) and start the managed server on 127.0.0.1; harmless if it is up."""
    from engine.integrations.labelstudio import LabelStudioError, start_server
    from engine.integrations.runtime import server_settings

    cfg = read_config(config)
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

    cfg = read_config(config)
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

    settings = server_settings(read_config(config))
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
                   poll_s: float = typer.Option(5.0, "--poll-s", help="How often to look for a newly promoted model."),
                   workers: int = typer.Option(8, min=1, help="Requests answered at once (worker threads)."),
                   max_connections: int = typer.Option(512, min=1, help="Open connections held at most; beyond it "
                                                       "new ones wait in the listen backlog."),
                   idle_timeout_s: int = typer.Option(30, min=1, help="Close a connection idle this long.")) -> None:
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
        ServerLimits,
        source_image_loader,
    )
    from model.checkpoints import CheckpointError

    torch.set_num_threads(max(1, threads))
    cfg = read_config(config)
    try:
        seg = runtime.segmenter(cfg, checkpoint or runtime.current_model(cfg))
        embeddings = cfg.path("embeddings")
        state = BackendState(MaskPredictor(seg, EmbeddingCache(seg, precomputed_dir=embeddings)),
                             token=runtime.ml_backend_token(cfg), image_loader=None, concept=concept_predictor(cfg))
        state.image_loader = source_image_loader(runtime.image_source(cfg), runtime.labelstudio_url(cfg), state)
        server = MLBackend(state, host, cfg.labelstudio.ml_backend_port if port is None else port, allow_remote,
                           ServerLimits(threads=workers, connection_limit=max_connections,
                                        channel_timeout_s=idle_timeout_s))
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
        summary = annotate_project(read_config(config), project, checkpoint, annotator, via)
    except (LabelStudioError, ValueError) as e:
        fail(str(e), code=1)
    sys.stdout.write(json.dumps(summary) + "\n")
