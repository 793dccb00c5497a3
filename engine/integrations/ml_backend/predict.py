"""Our Label Studio ML backend: clicks and boxes in, a mask from the current model out.

Label Studio's ML backend protocol over HTTP (served by ml_backend/server.py):
    GET  /health   -> {"status": "UP", "model_version", "predictions"} (Label Studio waits 1 s)
    POST /setup    -> {"model_version"}                              (remembers hostname + access token)
    POST /predict  {tasks, project, label_config, params: {context}} -> {"results": [{result, score,
                   model_version}]}; interactive: `context.result` holds keypointlabels (x/y in percent,
                   is_positive) and/or rectanglelabels (x/y/width/height in percent); the answer is one
                   brush region. Without a context (batch predictions) the answer is empty.
    POST /prefetch {tasks} -> {"queued"}: embed these tasks' images ahead, in this order
    POST /webhook  -> {"status": "ok"} (events are counted, nothing else)
Every call needs credentials: HTTP basic auth (what Label Studio sends; user `sa-engine`, password =
the backend token) or `Authorization: Token <token>` / `Bearer <token>`. Anything else gets 401.

A click costs a decoder pass only: image embeddings are kept in an LRU cache keyed by (model
version, image id), filled from embeddings precomputed by a batch job (`precompute_embeddings`,
one .npz per image under `<dir>/<model_version>/`) or computed on first use. With several clicks
the previous low-res logits of the same click sequence are fed back as `mask_input` (SAM's loop).
"""
from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from engine.integrations.labelstudio import brush_result
from engine.integrations.origin_http import open_on_origin, same_origin
from engine.integrations.ml_backend.embeddings import (EmbeddingCache, load_embedding,  # noqa: F401  (re-exported)
                                                       precompute_embeddings, save_embedding)
from storage.images import BadImage, decode_image

log = logging.getLogger(__name__)

BASIC_USER = "sa-engine"


# --------------------------------------------------------------------------- embeddings


# --------------------------------------------------------------------------- prompts -> mask


@dataclass
class Prompt:
    """Prompts in pixels of the task image: points (K, 2) XY, labels (K,) 1/0, box XYXY or None."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None


def _number(v: dict, key: str) -> float:
    try:
        x = float(v[key])
    except (KeyError, TypeError, ValueError):
        raise RequestError(400, f"interactive context: value.{key} must be a number") from None
    if not np.isfinite(x):
        raise RequestError(400, f"interactive context: value.{key} must be finite")
    return x


def prompt_from_context(context: dict, height: int, width: int) -> Prompt:
    """Label Studio's interactive context -> pixel prompts. Raises RequestError (400) if there is none or a
    region is malformed."""
    pts, labs, box = [], [], None
    for r in (context or {}).get("result") or []:
        if not isinstance(r, dict):
            raise RequestError(400, "interactive context: each result must be an object")
        kind = str(r.get("type", "")).lower()
        v = r.get("value") or {}
        if not isinstance(v, dict):
            raise RequestError(400, "interactive context: a result's value must be an object")
        W = _number(r, "original_width") if r.get("original_width") else float(width)
        H = _number(r, "original_height") if r.get("original_height") else float(height)
        if W <= 0 or H <= 0:
            raise RequestError(400, "interactive context: original_width/original_height must be positive")
        sx, sy = width / W, height / H  # the editor may report another size for the same image
        if kind == "keypointlabels":
            x = _number(v, "x") / 100.0 * W * sx - 0.5
            y = _number(v, "y") / 100.0 * H * sy - 0.5
            names = v.get("keypointlabels") or []
            names = [str(n).lower() for n in (names if isinstance(names, list) else [names])]
            positive = r.get("is_positive", True) and "negative" not in names
            pts.append((min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)))
            labs.append(1 if positive else 0)
        elif kind == "rectanglelabels":
            x0, y0 = _number(v, "x") / 100.0 * W * sx, _number(v, "y") / 100.0 * H * sy
            x1, y1 = x0 + _number(v, "width") / 100.0 * W * sx, y0 + _number(v, "height") / 100.0 * H * sy
            box = np.clip(np.array([x0, y0, x1, y1], np.float64), 0, [width, height, width, height])
    if not pts and box is None:
        raise RequestError(400, "interactive context holds no keypoints or rectangles")
    return Prompt(np.asarray(pts, np.float64).reshape(-1, 2), np.asarray(labs, np.int64), box)


def text_from_context(context: dict) -> str | None:
    """The noun phrase of a TextArea in Label Studio's interactive context (SAM 3 concept prompt), or None."""
    for r in (context or {}).get("result") or []:
        if str(r.get("type", "")).lower() == "textarea":
            texts = (r.get("value") or {}).get("text") or []
            texts = [texts] if isinstance(texts, str) else texts
            phrase = " ".join(str(t).strip() for t in texts if str(t).strip())
            if phrase:
                return phrase
    return None


class ConceptPredictor:
    """A phrase on an image -> every instance (SAM 3), the image's vision features cached. Thread-safe."""

    def __init__(self, concept, score_thresh: float = 0.5, mask_thresh: float = 0.5, max_instances: int = 100,
                 cache_items: int = 16):
        self.concept = concept
        self.score_thresh, self.mask_thresh, self.max_instances = score_thresh, mask_thresh, max_instances
        self._lock = threading.Lock()
        self._embeddings: OrderedDict[str, object] = OrderedDict()
        self._items = cache_items

    @property
    def model_version(self) -> str:
        return self.concept.model_version

    def predict(self, image_id: str, load_pixels: Callable[[], np.ndarray], phrase: str) -> list:
        """-> ConceptMasks (mask (H, W) bool, score, box), best first."""
        with self._lock:
            emb = self._embeddings.get(image_id)
            if emb is None:
                emb = self._embeddings[image_id] = self.concept.embed(load_pixels())
                while len(self._embeddings) > self._items:
                    self._embeddings.popitem(last=False)
            self._embeddings.move_to_end(image_id)
            return self.concept.segment(emb, phrase, self.score_thresh, self.mask_thresh, self.max_instances)


class MaskPredictor:
    """Prompts on an image -> one mask, from a Segmenter with an embedding cache. Thread-safe."""

    def __init__(self, segmenter, cache: EmbeddingCache | None = None, logits_cache_items: int = 256):
        self.segmenter = segmenter
        self.cache = cache or EmbeddingCache(segmenter)
        self._lock = threading.Lock()
        self._logits: OrderedDict[tuple, object] = OrderedDict()
        self._logits_items = logits_cache_items

    @property
    def model_version(self) -> str:
        return self.segmenter.model_version

    def predict(self, image_id: str, load_pixels: Callable[[], np.ndarray], prompt: Prompt) -> tuple[np.ndarray, float]:
        """-> (mask (H, W) bool, predicted IoU). One click: best of SAM's 3 masks; more clicks: a single
        mask, refined from the logits of the same click sequence minus its last click."""
        emb = self.cache.get(image_id, load_pixels)  # outside the lock: other images' clicks go on meanwhile
        with self._lock:
            k = len(prompt.labels)
            box_key = None if prompt.box is None else tuple(np.round(prompt.box, 1))
            seq = tuple((round(float(x), 1), round(float(y), 1), int(lab))
                        for (x, y), lab in zip(prompt.points, prompt.labels))
            prev = self._logits.get((self.model_version, image_id, box_key, seq[:-1])) if k > 1 else None
            kwargs = {}
            if k:
                kwargs.update(points=prompt.points[None], labels=prompt.labels[None])
            if prompt.box is not None:
                kwargs["boxes"] = prompt.box[None]
            if prev is not None:
                kwargs["mask_input"] = prev[None, None]
            multimask = k <= 1 and prompt.box is None
            pred = self.segmenter.predict(emb, multimask=multimask, upsample=False, **kwargs)
            ious = pred.iou_pred[0]
            best = int(ious.argmax())
            low = pred.low_res_logits[0, best]
            self._logits[(self.model_version, image_id, box_key, seq)] = low.numpy()
            while len(self._logits) > self._logits_items:
                self._logits.popitem(last=False)
            mask = (self.segmenter.upsample_logits(low[None], emb)[0] > 0).numpy()
            return mask, float(ious[best])


# --------------------------------------------------------------------------- HTTP


@dataclass
class BackendState:
    predictor: MaskPredictor
    token: str
    image_loader: Callable[[dict], tuple[str, Callable[[], np.ndarray]]]
    ls_hostname: str | None = None  # as Label Studio sent it in /setup: shown, never trusted for fetching
    ls_access_token: str | None = None
    webhooks: int = 0
    predictions: int = 0
    last_error: str | None = None
    timings_ms: list = field(default_factory=list)
    concept: ConceptPredictor | None = None  # SAM 3 text prompts (stages.concept.checkpoint), else None


def authorized(header: str | None, token: str) -> bool:
    """Basic (user sa-engine, password = token) or `Token`/`Bearer` with the token. Compared as bytes: a header
    with characters outside ASCII is simply not the token (401), never an error."""
    if not header or not token:
        return False
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    want = token.encode()
    if scheme in ("token", "bearer"):
        return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), want)
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except ValueError:
            return False
        return hmac.compare_digest(user, BASIC_USER.encode()) & hmac.compare_digest(password, want)
    return False


class RequestError(ValueError):
    """A request the backend can't answer, with the HTTP status that says why (400: malformed, 404: no such
    image, 413: too large, 422: an image that can't be used)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _task_size(task: dict) -> tuple[int, int]:
    data = task.get("data")
    if not isinstance(data, dict):
        raise RequestError(400, f"task {task.get('id')}: 'data' must be an object")
    try:
        height, width = int(data["height"]), int(data["width"])
    except (KeyError, TypeError, ValueError):
        raise RequestError(400, f"task {task.get('id')}: data.height and data.width must be numbers") from None
    if not (0 < height <= 1 << 20 and 0 < width <= 1 << 20):
        raise RequestError(400, f"task {task.get('id')}: image size {width}x{height} is out of range")
    return height, width


def _load(state: "BackendState", task: dict):
    """(image_id, pixel loader) for a task; the loader's failures become RequestErrors."""
    try:
        image_id, load = state.image_loader(task)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(400, str(e)) from None

    def load_pixels() -> np.ndarray:
        try:
            return load()
        except BadImage as e:
            raise RequestError(404 if _missing(e) else 422, str(e)) from None
        except (TimeoutError, OSError) as e:
            raise RequestError(422, f"task {task.get('id')}: image could not be fetched ({e})") from None
        except RequestError:
            raise
        except ValueError as e:  # an image id the store refuses as a key (`..`, absolute paths)
            raise RequestError(400, f"task {task.get('id')}: {e}") from None
    return image_id, load_pixels


def _missing(e: BadImage) -> bool:
    return e.transient and "not found" in str(e)


def predict_payload(state: BackendState, payload: dict) -> dict:
    """The body of a /predict answer. Raises RequestError for a request it can't answer."""
    params = payload.get("params") or {}
    tasks = payload.get("tasks") or []
    if not isinstance(params, dict) or not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise RequestError(400, "predict: 'params' must be an object and 'tasks' a list of objects")
    context = params.get("context")
    if context is not None and not isinstance(context, dict):
        raise RequestError(400, "predict: params.context must be an object")
    result = (context or {}).get("result")
    if not result:
        return {"results": []}  # batch predictions are imported by the stages, not made here
    if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
        raise RequestError(400, "predict: params.context.result must be a list of objects")

    results = []
    predictor = state.predictor  # once: a model switch during this request must not mix two models' answers
    phrase = text_from_context(context)
    if phrase is not None and not any(str(r.get("type", "")).lower() in ("keypointlabels", "rectanglelabels")
                                      for r in result):
        return concept_payload(state, tasks, phrase)
    for task in tasks[:1]:  # interactive calls carry exactly one task
        height, width = _task_size(task)
        prompt = prompt_from_context(context, height, width)
        image_id, load_pixels = _load(state, task)
        mask, score = predictor.predict(image_id, load_pixels, prompt)
        if mask.shape != (height, width):
            raise RequestError(422, f"task {task.get('id')}: image is {mask.shape[1]}x{mask.shape[0]}, "
                                    f"task says {width}x{height}")
        results.append({"result": [brush_result(mask, height, width)], "score": score,
                        "model_version": predictor.model_version})
    state.predictions += len(results)
    return {"results": results}


def prefetch_payload(state: BackendState, payload: dict) -> dict:
    """POST /prefetch {"tasks": [...]}: embed these tasks' images ahead, in this order (the next task an
    annotator is likely to open first). Label Studio task objects, as /predict gets them."""
    tasks = payload.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise RequestError(400, "prefetch: 'tasks' must be a list of objects")
    images = []
    for task in tasks:
        image_id, load_pixels = _load(state, task)
        images.append((image_id, load_pixels))
    return {"queued": state.predictor.cache.prefetch(images), "model_version": state.predictor.model_version}


def concept_payload(state: BackendState, tasks: list[dict], phrase: str) -> dict:
    """A text prompt: every instance of `phrase` as one brush region each, in one answer (best first)."""
    if state.concept is None:
        raise RequestError(422, f"text prompt {phrase!r}: this backend has no SAM 3 model "
                                "(stages.concept.checkpoint)")
    results = []
    for task in tasks[:1]:
        height, width = _task_size(task)
        image_id, load_pixels = _load(state, task)
        found = state.concept.predict(image_id, load_pixels, phrase)
        if found and found[0].mask.shape != (height, width):
            raise RequestError(422, f"task {task.get('id')}: image is {found[0].mask.shape[1]}x{found[0].mask.shape[0]}, "
                             f"task says {width}x{height}")
        regions = [brush_result(m.mask, height, width, meta={"text": [f"{phrase} {m.score:.2f}"]}) for m in found]
        results.append({"result": regions, "score": max((m.score for m in found), default=0.0),
                        "model_version": state.concept.model_version})
    state.predictions += len(results)
    return {"results": results}


class ModelFollower:
    """Keeps a running backend on the model in use: every `every` seconds it asks `current()` for the checkpoint
    in use; when that changes, `load(checkpoint)` builds the new segmenter and the backend's predictor is swapped
    (a new embedding cache: caches are per model version). No restart: requests in flight finish on the old
    model, the next answers carry the new `model_version`. A checkpoint that fails to load is reported through
    `log` once and the old model goes on serving."""

    def __init__(self, state: BackendState, current: Callable[[], str | None], load: Callable[[str | None], object],
                 precomputed_dir: Path | str | None = None, every: float = 5.0,
                 log: Callable[[str], None] = lambda msg: None):
        self.state, self.current, self.load = state, current, load
        self.precomputed_dir, self.every, self.log = precomputed_dir, every, log
        self.following = current()
        self.failed: str | None = None
        self.switches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ml-backend-model-follower", daemon=True)

    def check(self) -> bool:
        """One look at the model in use; True when the backend switched to it."""
        wanted = self.current()
        if wanted is None or wanted == self.following or wanted == self.failed:
            return False
        try:
            segmenter = self.load(wanted)
        except Exception as e:  # a half-written or broken checkpoint must not take the backend down
            self.failed = wanted
            self.log(f"ML backend: cannot switch to {wanted} ({' '.join(str(e).split())[:200]}); still serving "
                     f"{self.state.predictor.model_version}")
            return False
        old = self.state.predictor.cache
        cache = EmbeddingCache(segmenter, max_items=old.max_items, precomputed_dir=self.precomputed_dir)
        # The images annotators were working on, most recent first, embedded by the new model ahead of their
        # next click (the loaders are the ones the old cache was given).
        cache.prefetch(old.loaders())
        self.state.predictor = MaskPredictor(segmenter, cache)
        old.close()
        self.following, self.switches = wanted, self.switches + 1
        self.log(f"ML backend: now serving {segmenter.model_version} ({wanted})")
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.check()

    def start(self) -> "ModelFollower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


MAX_IMAGE_BYTES = 256 * 2**20  # an image fetched from Label Studio larger than this is refused
FETCH_DEADLINE_S = 60.0  # a fetch from Label Studio that takes longer than this in all is given up


def source_image_loader(image_source, trusted_ls_url: str | None = None, state: BackendState | None = None):
    """Resolve a task to (image_id, pixel loader): from our ImageSource by the task's image_id (the same pixels
    the store's masks use); else the task's image from the configured Label Studio, `trusted_ls_url`, and from
    no other host: a relative media URL is taken on that server, an absolute one must be on it (no file://, no
    other hosts, so Label Studio's token never reaches anything else)."""

    def loader(task: dict):
        data = task.get("data") or {}
        image_id = data.get("image_id")
        if image_id is not None and image_source is not None:
            return image_id, lambda: image_source.load(image_source.ref(image_id)).pixels
        url = data.get("image")
        if not isinstance(url, str) or not url:
            raise ValueError(f"task {task.get('id')}: no image_id or image URL in its data")
        if not trusted_ls_url:
            raise ValueError(f"task {task.get('id')}: no image_id, and this backend fetches images only from "
                             "the configured Label Studio, which is not set")
        full = url if "://" in url else f"{trusted_ls_url.rstrip('/')}/{url.lstrip('/')}"
        if not same_origin(full, trusted_ls_url):
            raise ValueError(f"task {task.get('id')}: image URL {url[:200]!r} is not on the configured Label "
                             f"Studio ({trusted_ls_url}); refusing to fetch it")
        token = state.ls_access_token if state else None

        def fetch() -> np.ndarray:
            # redirects followed only on the configured Label Studio: the token never reaches another hop.
            # The socket timeout bounds each read; the deadline bounds the whole fetch (a server sending a
            # byte every few seconds never trips the former).
            deadline = time.monotonic() + FETCH_DEADLINE_S
            chunks, size = [], 0
            with open_on_origin(full, trusted_ls_url, {"Authorization": f"Token {token}"} if token else {},
                                timeout=min(30.0, FETCH_DEADLINE_S)) as r:
                while chunk := r.read1(1 << 16) if hasattr(r, "read1") else r.read(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_IMAGE_BYTES:
                        raise RequestError(413, f"task {task.get('id')}: image at {full} is over "
                                                f"{MAX_IMAGE_BYTES >> 20} MiB")
                    if time.monotonic() > deadline:
                        raise RequestError(422, f"task {task.get('id')}: image at {full} took over "
                                                f"{FETCH_DEADLINE_S:.0f} s to fetch")
            return decode_image(b"".join(chunks), full)  # the stages' decoder: the same pixels as the store's

        return image_id or url, fetch

    return loader
