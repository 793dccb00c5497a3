"""The assisted-manual stage: annotators in Label Studio, our model answering their clicks.

One round: ensure the Label Studio server (managed, or an existing one) and our ML backend, create the
round's project, import the round's images as tasks, precompute their embeddings, (simulated mode)
let simulated annotators label them through the real API, then pull the annotations back into the
shard store with lineage (stage=manual, round, annotator, lead time, Label Studio ids, verified).

Pulling is idempotent: a mask's id is derived from (project, task, annotation, region), a mask whose
RLE is already stored is not written again, an edited annotation replaces the older version (the
store's upsert keeps the history). Bad regions (empty, wrong size, corrupt RLE) go to the quarantine.
Everything is read from Label Studio before anything is written, so an unreachable server leaves
nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path

import numpy as np

from engine.config import EngineConfig
from engine.labelstudio import (LabelStudio, LabelStudioError, PullResult, ServerInfo, ServerSettings, TaskImage,
                                start_server)
from storage.records import MaskRecord, make_mask_id

log = logging.getLogger(__name__)
STAGE = "manual"


# --------------------------------------------------------------------------- wiring


def server_settings(cfg: EngineConfig) -> ServerSettings:
    """The managed server of this work dir: data under <workdir>/labelstudio, files served from <workdir>."""
    ls = cfg.labelstudio
    return ServerSettings(data_dir=Path(cfg.path("labelstudio")), port=ls.port, username=ls.username,
                          password=ls.password, token=ls.token, document_root=Path(cfg.workdir).resolve())


def connect(cfg: EngineConfig, log_fn=log.info) -> tuple[LabelStudio, ServerInfo]:
    """Start (or find running) the managed server, or connect to the configured existing one."""
    ls = cfg.labelstudio
    if ls.managed:
        info = start_server(server_settings(cfg), log=log_fn)
    else:
        token = os.environ.get("SA_ENGINE_LS_TOKEN") or ls.token
        if not ls.url or not token:
            raise LabelStudioError("labelstudio.url and labelstudio.token (or SA_ENGINE_LS_TOKEN) are needed "
                                   "when labelstudio.managed is false")
        info = ServerInfo(url=ls.url, token=token, pid=None, port=0, data_dir="", managed=False)
    return LabelStudio(info.url, info.token), info


def backend_token(cfg: EngineConfig) -> str:
    """The ML backend's secret: config, env SA_ENGINE_ML_BACKEND_TOKEN, or generated once per work dir."""
    token = os.environ.get("SA_ENGINE_ML_BACKEND_TOKEN") or cfg.labelstudio.ml_backend_token
    if token:
        return token
    path = Path(cfg.path("labelstudio")) / "ml_backend_token"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(20)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(token)
    tmp.chmod(0o600)
    os.replace(tmp, path)
    return token


def load_segmenter(cfg: EngineConfig, checkpoint: str | None):
    from model.segmenter import Segmenter

    path = checkpoint or cfg.model.checkpoint
    return Segmenter.load(cfg.path(path)) if path else Segmenter.new(cfg.model.preset)


def image_source(cfg: EngineConfig):
    from storage.images import ImageSource

    return ImageSource(cfg.path(cfg.images.source), max_side=cfg.images.max_side,
                       large_images=cfg.images.large_images, s3_endpoint_url=cfg.storage.s3_endpoint_url)


def start_backend(cfg: EngineConfig, segmenter, source, port: int | None = None):
    """Our ML backend in a background thread of this process, on 127.0.0.1."""
    from engine.ml_backend import BackendState, EmbeddingCache, MaskPredictor, MLBackend, source_image_loader

    cache = EmbeddingCache(segmenter, precomputed_dir=cfg.path("embeddings"))
    state = BackendState(MaskPredictor(segmenter, cache), token=backend_token(cfg), image_loader=None)
    state.image_loader = source_image_loader(source, state=state)
    port = cfg.labelstudio.ml_backend_port if port is None else port
    try:
        return MLBackend(state, "127.0.0.1", port).start()
    except OSError as e:
        raise LabelStudioError(f"ML backend: cannot listen on 127.0.0.1:{port} ({e.strerror}); "
                               "set labelstudio.ml_backend_port to a free port") from None


def task_images(cfg: EngineConfig, source, image_ids: list[str], quarantine=None) -> tuple[list[TaskImage], dict]:
    """TaskImages for the ids, and their pixels. A local image used at full size is served as it is;
    downscaled or S3 images are served from a PNG copy under <workdir>/labelstudio-media. Bad images
    go to the quarantine and are left out."""
    from PIL import Image

    from storage.images import BadImage

    root = Path(cfg.workdir).resolve()
    media = Path(cfg.path("labelstudio-media"))
    out, pixels = [], {}
    for image_id in image_ids:
        ref = source.ref(image_id)
        try:
            loaded = source.load(ref)
        except BadImage as e:
            if quarantine is not None:
                quarantine.add(ref.uri, str(e), STAGE)
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
    return out, pixels


def allow_serving(ls: LabelStudio, project_id: int, images: list[TaskImage], root: Path) -> None:
    """Register a Local Storage for each folder the tasks' files are in: Label Studio serves a local
    file only under such a record, and refuses one for the document root itself."""
    from urllib.parse import parse_qs, urlparse

    folders = set()
    for im in images:
        rel = parse_qs(urlparse(im.url).query).get("d")
        if rel:
            folders.add((root / rel[0]).parent)
    for folder in sorted(folders):
        ls.add_local_storage(project_id, folder)


def project_title(cfg: EngineConfig, round: int) -> str:
    """Unique per work dir and round, within Label Studio's 50-character limit."""
    workdir = Path(cfg.workdir).resolve()
    tag = hashlib.sha1(str(workdir).encode()).hexdigest()[:6]
    return f"manual r{round} {workdir.name[:24]} {tag}"


# --------------------------------------------------------------------------- pull-back


def records_from_pull(pull: PullResult, project_id: int, round: int, model_version: str | None) -> list[MaskRecord]:
    """One verified MaskRecord per pulled region (COCO RLE), lineage in `source`."""
    from storage.rle import encode_masks, rle_area, rle_bbox

    out = []
    for ann in pull.annotations:
        if not ann.regions:
            continue
        masks = np.stack([r.mask for r in ann.regions])
        rles = encode_masks(masks)
        areas, boxes = rle_area(rles), rle_bbox(rles)
        n = len(ann.regions)
        for r, rle, area, box in zip(ann.regions, rles, areas, boxes):
            clicks = r.meta.get("clicks")
            seconds = r.meta.get("lead_time_s")
            if seconds is None and ann.lead_time_s is not None:
                seconds = float(ann.lead_time_s) / n  # a person's time, shared evenly by the masks
            out.append(MaskRecord(
                image_id=ann.image_id,
                mask_id=make_mask_id(ann.image_id, "ls", project_id, ann.task_id, ann.annotation_id, r.region_id),
                height=ann.height, width=ann.width, rle=rle, area=int(area), bbox=[float(v) for v in box],
                stage=STAGE, round=round, model_version=model_version, origin="manual",
                annotator=ann.annotator, verified=True,
                source={"ls_project": project_id, "ls_task": ann.task_id, "ls_annotation": ann.annotation_id,
                        "ls_region": r.region_id, "ls_updated_at": ann.updated_at,
                        "ls_prediction": r.prediction_id},
                clicks=None if clicks is None else int(clicks),
                lead_time_s=None if seconds is None else float(seconds)))
    return out


def pull_to_store(ls: LabelStudio, project_id: int, store, round: int, model_version: str | None,
                  quarantine=None, expected_tasks: dict[str, int] | None = None) -> dict:
    """Pull the project's annotations into the store. Returns counts: pulled, written (new + updated),
    unchanged, problems, missing_tasks, images."""
    pull = ls.pull(project_id)  # everything is read before anything is written
    records = records_from_pull(pull, project_id, round, model_version)
    problems = list(pull.problems)
    present = set(pull.task_ids)
    missing = sorted(tid for tid in (expected_tasks or {}).values() if tid not in present)
    problems += [(f"task {tid}", "deleted in Label Studio before the pull") for tid in missing]
    existing = {}
    if records and store.shards():
        table = store.read_table(columns=["mask_id", "rle"], stage=STAGE,
                                 image_ids=sorted({r.image_id for r in records}))
        existing = dict(zip(table.column("mask_id").to_pylist(), table.column("rle").to_pylist()))
    todo = [r for r in records if existing.get(r.mask_id) != r.to_row()["rle"]]
    if todo:
        store.upsert(todo, stage=STAGE, round=round, model_version=model_version)
    done_images = {}
    for r in records:
        done_images[r.image_id] = done_images.get(r.image_id, 0) + 1
    new_images = sorted(i for i in done_images if i in {r.image_id for r in todo})
    if new_images:
        with store.writer(stage=STAGE, round=round, model_version=model_version) as w:
            for image_id in new_images:
                w.image_done(image_id, done_images[image_id])
            w.commit()
    if quarantine is not None:
        for thing, reason in problems:
            quarantine.add(f"labelstudio project {project_id} {thing}", reason, STAGE)
    return {"pulled": len(records), "written": len(todo), "updated": sum(r.mask_id in existing for r in todo),
            "unchanged": len(records) - len(todo), "problems": len(problems), "missing_tasks": len(missing),
            "images": len(done_images)}


# --------------------------------------------------------------------------- the stage


def run_manual_stage(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str] | None = None,
                     simulate: bool = True, poll_s: float = 30.0) -> dict:
    """One assisted-manual round. image_ids None: the first `images_per_round` images of the source
    that no manual round has done yet. simulate=False: set up and serve, wait until every task has
    an annotation (Ctrl-C pulls what is there), then pull. Returns the stage summary."""
    from engine.annotator import AnnotatorSettings, SimulatedAnnotator, effort_summary, load_ground_truth
    from engine.ml_backend import BASIC_USER, precompute_embeddings
    from storage.quarantine import Quarantine
    from storage.shards import MaskStore

    t0 = time.monotonic()
    m = cfg.stages.manual
    store = MaskStore(cfg.path(cfg.storage.root), s3_endpoint_url=cfg.storage.s3_endpoint_url,
                      shard_target_mb=cfg.storage.shard_target_mb, s3_region=cfg.storage.s3_region)
    quarantine = Quarantine(cfg.path(cfg.storage.root), s3_endpoint_url=cfg.storage.s3_endpoint_url)
    source = image_source(cfg)
    if image_ids is None:
        done = store.images_done(STAGE)
        image_ids = [r.image_id for r in source.list() if r.image_id not in done][: m.images_per_round]
    ls, info = connect(cfg)
    segmenter = load_segmenter(cfg, checkpoint)
    images, pixels = task_images(cfg, source, image_ids, quarantine)
    precomputed = precompute_embeddings(segmenter, list(pixels.items()), cfg.path("embeddings"))
    project_id = ls.ensure_project(project_title(cfg, round),
                                   description=f"round {round}, model {segmenter.model_version}")
    allow_serving(ls, project_id, images, Path(cfg.workdir).resolve())
    tasks = ls.import_tasks(project_id, images)
    efforts = []
    with start_backend(cfg, segmenter, source) as backend:
        backend_id = ls.connect_ml_backend(project_id, backend.url, BASIC_USER, backend.state.token)
        if simulate:
            if not cfg.images.ground_truth:
                raise LabelStudioError("stages.simulate needs images.ground_truth (COCO JSON)")
            gt = load_ground_truth(cfg.path(cfg.images.ground_truth))
            annotator = SimulatedAnnotator(ls, backend_id, settings=AnnotatorSettings(
                max_clicks=m.max_clicks, iou_target=m.iou_target, seconds_per_click=m.seconds_per_click,
                seconds_per_mask=m.seconds_per_mask, image_time_limit_s=m.image_time_limit_s))
            annotated = ls.annotated_task_ids(project_id)
            for im in images:
                if tasks[im.image_id] in annotated:
                    continue  # a resumed round: this image was submitted before
                efforts.append(annotator.annotate_image(tasks[im.image_id], im, gt.get(im.image_id, [])))
        else:
            log.warning("Label Studio project %s at %s/projects/%s: waiting for annotations (Ctrl-C to pull now)",
                        project_id, ls.url, project_id)
            try:
                while len(ls.annotated_task_ids(project_id)) < len(tasks):
                    time.sleep(poll_s)
            except KeyboardInterrupt:
                pass
        embed_stats = {"hits": backend.state.predictor.cache.hits, "misses": backend.state.predictor.cache.misses,
                       "precomputed": backend.state.predictor.cache.precomputed}
    pulled = pull_to_store(ls, project_id, store, round, segmenter.model_version, quarantine, tasks)
    masks = store.read_table(columns=["image_id", "clicks", "lead_time_s"], stage=STAGE, round=round,
                             image_ids=sorted(tasks))
    n = masks.num_rows
    clicks = [c for c in masks.column("clicks").to_pylist() if c is not None]
    secs = [s for s in masks.column("lead_time_s").to_pylist() if s is not None]
    summary = {
        "stage": STAGE, "round": round, "images": len(tasks), "masks": n,
        "masks_per_image": round_or_none(n / len(tasks) if tasks else None),
        "clicks_per_mask": round_or_none(sum(clicks) / len(clicks) if clicks else None),
        "seconds_per_mask": round_or_none(sum(secs) / len(secs) if secs else None),
        "ls_project_id": project_id, "ls_url": ls.url, "model_version": segmenter.model_version,
        "pull": pulled, "embeddings": {**embed_stats, "precomputed_now": precomputed},
        "simulated": effort_summary(efforts) if simulate else None,
        "wall_s": round_or_none(time.monotonic() - t0, 1),
    }
    return json.loads(json.dumps(summary, default=str))


def round_or_none(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(float(v), digits)


def annotate_project(cfg: EngineConfig, project: str | int, checkpoint: str | None = None,
                     annotator_name: str = "sim-annotator-1", via: str = "labelstudio") -> dict:
    """Simulated annotation of an existing project's unannotated tasks (tasks made by sa-engine:
    data has image_id, height, width). Serves our ML backend meanwhile. Returns the effort summary."""
    from engine.annotator import AnnotatorSettings, SimulatedAnnotator, effort_summary, load_ground_truth
    from engine.ml_backend import BASIC_USER

    if not cfg.images.ground_truth:
        raise LabelStudioError("annotate --simulate needs images.ground_truth (COCO JSON)")
    ls, _ = connect(cfg)
    project_id = int(project) if str(project).isdigit() else ls.find_project(str(project))
    if project_id is None:
        raise LabelStudioError(f"Label Studio {ls.url}: no project titled {project!r}")
    gt = load_ground_truth(cfg.path(cfg.images.ground_truth))
    tasks = ls._call("list tasks", lambda: list(ls.sdk.tasks.list(project=project_id, fields="all")))
    done = ls.annotated_task_ids(project_id)
    m = cfg.stages.manual
    segmenter = load_segmenter(cfg, checkpoint)
    efforts = []
    with start_backend(cfg, segmenter, image_source(cfg)) as backend:
        backend_id = ls.connect_ml_backend(project_id, backend.url, BASIC_USER, backend.state.token)
        annotator = SimulatedAnnotator(ls, backend_id, annotator_name, AnnotatorSettings(
            max_clicks=m.max_clicks, iou_target=m.iou_target, seconds_per_click=m.seconds_per_click,
            seconds_per_mask=m.seconds_per_mask, image_time_limit_s=m.image_time_limit_s), via=via,
            backend_url=backend.url, backend_token=backend.state.token)
        for t in tasks:
            data = t.data or {}
            if int(t.id) in done or not {"image_id", "height", "width"} <= set(data):
                continue
            im = TaskImage(data["image_id"], data.get("image", ""), int(data["height"]), int(data["width"]))
            efforts.append(annotator.annotate_image(int(t.id), im, gt.get(im.image_id, [])))
    return {"ls_project_id": project_id, "annotator": annotator_name, "via": via, **effort_summary(efforts)}
