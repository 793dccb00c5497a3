"""The Label Studio workflow the people stages share: connect, publish a round's images as tasks, serve our ML
backend, wait for people (or simulated ones), and what a pulled region's effort was.

The assisted-manual and semi-automatic stages are sequences of these steps (stages/manual.py, stages/semi.py);
`sa-engine annotate` runs simulated annotators on an existing project with them.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace
from typing import Callable
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np
import yaml
from PIL import Image

from engine.integrations import runtime
from engine.integrations.annotator import SimulatedAnnotator, effort_summary
from engine.integrations.config import EngineConfig
from engine.integrations.labelstudio import (
    LabelStudio,
    LabelStudioError,
    PrefillMask,
    PulledAnnotation,
    PulledRegion,
    ServerInfo,
    TaskImage,
    private_dir,
    start_server,
)
from engine.integrations.ml_backend import (
    BASIC_USER,
    BackendState,
    ConceptPredictor,
    EmbeddingCache,
    MaskPredictor,
    MLBackend,
    prefetch_payload,
    source_image_loader,
)
from engine.integrations.origin_http import open_on_origin
from storage.images import BadImage, ImageSource
from storage.quarantine import Quarantine

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- connect and serve

def connect(cfg: EngineConfig, log_fn: Callable[[str], None] = log.info) -> tuple[LabelStudio, ServerInfo]:
    """Start (or find running) the managed server, or connect to the configured existing one."""
    ls = cfg.labelstudio
    if ls.managed:
        info = start_server(runtime.server_settings(cfg), log=log_fn)
    else:
        token = os.environ.get("SA_ENGINE_LS_TOKEN") or ls.token
        if not ls.url or not token:
            raise LabelStudioError("labelstudio.url and labelstudio.token (or SA_ENGINE_LS_TOKEN) are needed "
                                   "when labelstudio.managed is false")
        info = ServerInfo(url=ls.url, token=token, pid=None, port=0, data_dir="", managed=False)
    return LabelStudio(info.url, info.token), info


SERVICE_SWITCH_WAIT_S = 12.0  # a running service follows a promotion within its poll (5 s): wait that long for it


class RunningBackend:
    """The ML backend service (`sa-engine ml-backend`, another process) as a stage uses it: its URL and token.
    A context manager like MLBackend, but leaving the block does not stop it: it outlives the stage, so
    annotators keep the model after the stage has pulled."""

    def __init__(self, url: str, token: str, model_version: str, pid: int | None = None):
        self.url, self.model_version, self.pid = url, model_version, pid
        self.state = SimpleNamespace(token=token, predictor=None)  # as MLBackend.state, for connect_backend

    def __enter__(self) -> "RunningBackend":
        return self

    def __exit__(self, *exc) -> None:
        pass


def backend_health(url: str, token: str, timeout_s: float = 2.0) -> dict | None:
    """GET /health of the ML backend at `url` with our token: its answer, or None when nothing answers there or
    it is not ours (another token)."""
    auth = base64.b64encode(f"{BASIC_USER}:{token}".encode()).decode()
    try:
        with open_on_origin(url.rstrip("/") + "/health", url, {"Authorization": f"Basic {auth}"},
                            timeout=timeout_s) as r:
            answer = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) and answer.get("status") == "UP" else None


def service_url(cfg: EngineConfig) -> str:
    """Where the ML backend service is looked for: `labelstudio.ml_backend_url`, else 127.0.0.1:ml_backend_port."""
    return (cfg.labelstudio.ml_backend_url or f"http://127.0.0.1:{cfg.labelstudio.ml_backend_port}").rstrip("/")


def running_backend(cfg: EngineConfig, model_version: str, wait_s: float = 0.0,
                    pid: int | None = None) -> RunningBackend | None:
    """The ML backend service (`service_url`) if it is ours and serves `model_version` (waiting up to `wait_s` for
    it to switch: it follows the model in use every few seconds); else None."""
    url, token = service_url(cfg), runtime.ml_backend_token(cfg)
    deadline = time.monotonic() + wait_s
    while True:
        health = backend_health(url, token)
        if health is not None and health.get("model_version") == model_version:
            return RunningBackend(url, token, model_version, pid)
        if time.monotonic() >= deadline:
            return None
        time.sleep(1.0)


def service_file(cfg: EngineConfig) -> Path:
    """Where a spawned ML backend service records its PID and URL (beside Label Studio's own)."""
    return Path(cfg.path("labelstudio")) / "ml_backend.json"


def spawn_ml_backend_service(cfg: EngineConfig, checkpoint: str | None, model_version: str,
                             log_fn: Callable[[str], None] = log.info, wait_s: float = 180.0) -> RunningBackend:
    """Start `sa-engine ml-backend` as a process of its own that outlives this stage (and follows the model in
    use), and wait until it serves `model_version`. `sa-engine labelstudio down` stops it with the server."""
    folder = private_dir(Path(cfg.path("labelstudio")))
    config = folder / "ml_backend.yaml"  # the stage's config as the service will read it
    config.write_text(yaml.safe_dump(json.loads(cfg.model_copy(
        update={"workdir": str(Path(cfg.workdir).resolve())}).model_dump_json())))
    cmd = [sys.executable, "-m", "engine.cli", "ml-backend", "--config", str(config)]
    if checkpoint:
        cmd += ["--checkpoint", runtime.checkpoint_path(cfg, checkpoint)]
    logfile = open(folder / "ml_backend.log", "ab")
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))
    logfile.close()
    url = f"http://127.0.0.1:{cfg.labelstudio.ml_backend_port}"
    service_file(cfg).write_text(json.dumps({"pid": proc.pid, "url": url, "log": str(folder / "ml_backend.log")}))
    log_fn(f"ML backend service starting at {url} (pid {proc.pid}); it stays up after this stage")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabelStudioError(f"ML backend service exited with status {proc.returncode}; see "
                                   f"{folder / 'ml_backend.log'}")
        found = running_backend(cfg, model_version)
        if found is not None:
            found.pid = proc.pid
            return found
        time.sleep(1.0)
    raise LabelStudioError(f"ML backend service did not serve {model_version} within {wait_s:.0f} s; see "
                           f"{folder / 'ml_backend.log'}")


def stop_ml_backend_service(cfg: EngineConfig) -> bool:
    """Stop a service `spawn_ml_backend_service` started (by its recorded PID). True if one was running."""
    path = service_file(cfg)
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        running = True
    except (ProcessLookupError, PermissionError):
        running = False
    path.unlink(missing_ok=True)
    return running


def start_ml_backend(cfg: EngineConfig, segmenter, source: ImageSource, ls_url: str | None,
                     port: int | None = None, people: bool = False,
                     checkpoint: str | None = None) -> "MLBackend | RunningBackend":
    """The ML backend a stage connects its projects to (a context manager).

    The service (`sa-engine ml-backend`, another process) when one runs on `labelstudio.ml_backend_port` with our
    token and this model (waiting a little for it to switch to it); else, for people (`people`), such a service
    is started, so that annotators keep the model after the stage; else (simulated annotators) one in a
    background thread of this process, on 127.0.0.1, stopped with the stage. ls_url: the Label Studio it
    serves, the one host it fetches task images from (when a task names no stored image)."""
    if port is None:
        url = service_url(cfg)
        service = backend_health(url, runtime.ml_backend_token(cfg))
        found = running_backend(cfg, segmenter.model_version, wait_s=SERVICE_SWITCH_WAIT_S if service else 0.0)
        if found is not None:
            log.info("using the ML backend service at %s (%s)", found.url, found.model_version)
            return found
        if cfg.labelstudio.ml_backend_url:  # a service configured elsewhere is the one to use: never a stand-in
            raise LabelStudioError(
                f"labelstudio.ml_backend_url: {url} " + ("does not answer with our token" if service is None else
                                                         f"serves {service.get('model_version')}, not this stage's "
                                                         f"model {segmenter.model_version}"))
        if service is not None and people:
            raise LabelStudioError(f"the ML backend service at {url} serves {service.get('model_version')}, not this "
                                   f"stage's model {segmenter.model_version}; stop it (`sa-engine labelstudio down`) "
                                   "so that the stage starts one with its model")
        if people:
            return spawn_ml_backend_service(cfg, checkpoint, segmenter.model_version)
        if service is not None:  # the service keeps its port and model; this stage's own goes beside it
            port = 0
    cache = EmbeddingCache(segmenter, precomputed_dir=cfg.path("embeddings"))
    state = BackendState(MaskPredictor(segmenter, cache), token=runtime.ml_backend_token(cfg), image_loader=None,
                         concept=concept_predictor(cfg))
    state.image_loader = source_image_loader(source, trusted_ls_url=ls_url, state=state)
    port = cfg.labelstudio.ml_backend_port if port is None else port
    try:
        return MLBackend(state, "127.0.0.1", port).start()
    except ValueError as e:
        raise LabelStudioError(f"{e}; set labelstudio.ml_backend_port to a free port") from None


def prefetch_embeddings(backend: "MLBackend | RunningBackend", images: list[TaskImage]) -> int:
    """Ask the stage's backend to embed these tasks' images ahead, in task order (the order annotators open
    them), so that the first click on each costs a decoder pass. Returns how many it queued (0 if a service
    could not be asked: the clicks still work, the first one on an image pays its embedding)."""
    tasks = [{"id": i, "data": {"image_id": im.image_id, "height": im.height, "width": im.width}}
             for i, im in enumerate(images)]
    if isinstance(backend, MLBackend):
        return prefetch_payload(backend.state, {"tasks": tasks})["queued"]
    try:
        with open_on_origin(f"{backend.url}/prefetch", backend.url,
                            {"Content-Type": "application/json", "Authorization": f"Token {backend.state.token}"},
                            data=json.dumps({"tasks": tasks}).encode(), method="POST", timeout=10) as r:
            return int(json.loads(r.read()).get("queued", 0))
    except (urllib.error.URLError, OSError, ValueError) as e:
        log.warning("ML backend %s: prefetch not accepted (%s)", backend.url, e)
        return 0


def concept_predictor(cfg: EngineConfig) -> ConceptPredictor | None:
    """The ML backend's SAM 3 text prompts when `stages.concept.checkpoint` is set, else None."""
    c = cfg.stages.concept
    if not c.checkpoint:
        return None
    return ConceptPredictor(runtime.concept_segmenter(cfg), c.score_thresh, c.mask_thresh, c.max_instances)


def connect_backend(ls: LabelStudio, project_id: int, backend: MLBackend) -> int:
    """Register the running backend with a project; returns Label Studio's id for it."""
    return ls.connect_ml_backend(project_id, backend.url, BASIC_USER, backend.state.token)


# --------------------------------------------------------------------------- publish

def project_title(cfg: EngineConfig, stage: str, round: int, page: int = 1) -> str:
    """Unique per work dir, stage, round and page, within Label Studio's 50-character title limit."""
    workdir = Path(cfg.workdir).resolve()
    tag = hashlib.sha1(str(workdir).encode()).hexdigest()[:6]
    return f"{stage} r{round}{'' if page == 1 else f' p{page}'} {workdir.name[:24]} {tag}"


def task_images(cfg: EngineConfig, source: ImageSource, image_ids: list[str], quarantine: Quarantine | None,
                stage: str) -> tuple[list[TaskImage], dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """TaskImages for the ids, their pixels (as the model and Label Studio see them) and their files' full
    (H, W). A local image used at full size is served as it is; downscaled or S3 images are served from a PNG
    copy under <workdir>/labelstudio-media. Bad images go to the quarantine and are left out."""
    root = Path(cfg.workdir).resolve()
    media = Path(cfg.path("labelstudio-media"))
    out, pixels, full_sizes = [], {}, {}
    for image_id in image_ids:
        ref = source.ref(image_id)
        try:
            loaded = source.load(ref)
        except BadImage as e:
            if quarantine is not None:
                quarantine.add(ref.uri, str(e), stage, e.kind)
            continue
        path = Path(ref.uri)
        if "://" in ref.uri or loaded.scale != 1.0 or not path.resolve().is_relative_to(root):
            path = media / (image_id.replace("/", "__") + ".png")
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.png")
                Image.fromarray(loaded.pixels).save(tmp)
                os.replace(tmp, path)
        h, w = loaded.pixels.shape[:2]
        out.append(TaskImage(image_id, LabelStudio.local_file_url(path, root), h, w))
        pixels[image_id] = loaded.pixels
        full_sizes[image_id] = tuple(loaded.original_size)
    return out, pixels, full_sizes


def at_full_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask drawn on a task's (possibly downscaled) image, at the image file's (H, W) (nearest neighbour):
    the store keeps every mask at the size of its image."""
    if mask.shape == tuple(size):
        return mask
    return cv2.resize(mask.view(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def allow_serving(ls: LabelStudio, project_id: int, images: list[TaskImage], root: Path) -> None:
    """Register a Local Storage for each folder the tasks' files are in: Label Studio serves a local
    file only under such a record, and refuses one for the document root itself."""
    folders = set()
    for im in images:
        rel = parse_qs(urlparse(im.url).query).get("d")
        if rel:
            folders.add((root / rel[0]).parent)
    for folder in sorted(folders):
        ls.add_local_storage(project_id, folder)


def publish(ls: LabelStudio, cfg: EngineConfig, title: str, description: str, images: list[TaskImage],
            prefills: dict[str, list[PrefillMask]] | None = None,
            model_version: str | None = None) -> tuple[int, dict[str, int]]:
    """Create (or find) the project, let it serve the images, import them as tasks (idempotent: an image
    already imported is not imported again). Returns (project id, {image_id: task id})."""
    project_id = ls.ensure_project(title, description=description, concept=bool(cfg.stages.concept.checkpoint))
    allow_serving(ls, project_id, images, Path(cfg.workdir).resolve())
    return project_id, ls.import_tasks(project_id, images, prefills, model_version=model_version)


# --------------------------------------------------------------------------- people

def wait_for_people(ls: LabelStudio, projects: dict[int, int], poll_s: float, announce: str,
                    login: str | None = None) -> None:
    """Block until every project has an annotation on each of its tasks; Ctrl-C stops waiting (what is
    there is pulled). projects: {project id: number of tasks}. Prints the announcement and the login, then a
    line at each poll (every `poll_s`, at most 30 s) with how far the annotators are."""
    print(announce, flush=True)
    if login:
        print(login, flush=True)
    every = min(float(poll_s), 30.0)
    try:
        while True:
            done = {pid: len(ls.annotated_task_ids(pid)) for pid in projects}
            if all(done[pid] >= n for pid, n in projects.items()):
                return
            print(f"waiting for annotators: {sum(min(done[p], n) for p, n in projects.items())}/"
                  f"{sum(projects.values())} tasks annotated", flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        pass


def login_line(cfg: EngineConfig, info: ServerInfo) -> str:
    """How a person logs in to the server the stage uses."""
    if not info.managed:
        return f"log in to {info.url} with your Label Studio account"
    return (f"log in to {info.url} as {info.username or cfg.labelstudio.username} (password: "
            f"`sa-engine labelstudio status --show-password --config …` prints it)")


def region_effort(ann: PulledAnnotation, region: PulledRegion) -> tuple[int | None, float | None]:
    """(clicks, seconds) of one pulled region: what the annotator recorded on it, else the annotation's
    lead time shared evenly by its regions."""
    clicks = region.meta.get("clicks")
    seconds = region.meta.get("lead_time_s")
    if seconds is None and ann.lead_time_s is not None and ann.regions:
        seconds = float(ann.lead_time_s) / len(ann.regions)
    return (None if clicks is None else int(clicks)), (None if seconds is None else float(seconds))


def annotate_project(cfg: EngineConfig, project: str | int, checkpoint: str | None = None,
                     annotator_name: str = "sim-annotator-1", via: str = "labelstudio") -> dict:
    """Simulated annotation of an existing project's unannotated tasks (tasks made by sa-engine:
    data has image_id, height, width). Serves our ML backend meanwhile. Returns the effort summary."""
    gt = runtime.ground_truth(cfg, "annotate --simulate")
    ls, _ = connect(cfg)
    project_id = int(project) if str(project).isdigit() else ls.find_project(str(project))
    if project_id is None:
        raise LabelStudioError(f"Label Studio {ls.url}: no project titled {project!r}")
    tasks = ls.tasks(project_id)
    done = ls.annotated_task_ids(project_id)
    segmenter = runtime.segmenter(cfg, checkpoint)
    efforts = []
    with start_ml_backend(cfg, segmenter, runtime.image_source(cfg), ls.url) as backend:
        annotator = SimulatedAnnotator(ls, connect_backend(ls, project_id, backend), annotator_name,
                                       runtime.annotator_settings(cfg), via=via,
                                       backend_url=backend.url, backend_token=backend.state.token)
        for t in tasks:
            data = t.data or {}
            if int(t.id) in done or not {"image_id", "height", "width"} <= set(data):
                continue
            im = TaskImage(data["image_id"], data.get("image", ""), int(data["height"]), int(data["width"]))
            efforts.append(annotator.annotate_image(int(t.id), im, gt.get(im.image_id, [])))
    return {"ls_project_id": project_id, "annotator": annotator_name, "via": via, **effort_summary(efforts)}
