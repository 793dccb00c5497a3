"""Our Label Studio ML backend: clicks and boxes in, a mask from the current model out.

Label Studio's ML backend protocol over HTTP (stdlib server, threads):
    GET  /health   -> {"status": "UP", "model_version", "predictions"} (Label Studio waits 1 s)
    POST /setup    -> {"model_version"}                              (remembers hostname + access token)
    POST /predict  {tasks, project, label_config, params: {context}} -> {"results": [{result, score,
                   model_version}]}; interactive: `context.result` holds keypointlabels (x/y in percent,
                   is_positive) and/or rectanglelabels (x/y/width/height in percent); the answer is one
                   brush region. Without a context (batch predictions) the answer is empty.
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
import hashlib
import hmac
import ipaddress
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.integrations.labelstudio import brush_result
from engine.integrations.origin_http import open_on_origin, same_origin
from model.segmenter import ImageEmbedding
from storage.images import decode_image

log = logging.getLogger(__name__)

BASIC_USER = "sa-engine"


# --------------------------------------------------------------------------- embeddings


def _embedding_path(directory: Path, model_version: str, image_id: str) -> Path:
    safe = hashlib.sha1(image_id.encode()).hexdigest()[:20]
    return Path(directory) / model_version / f"{safe}.npz"


def save_embedding(directory: Path | str, model_version: str, image_id: str, emb) -> Path:
    """Write one ImageEmbedding (features and the family's extras, e.g. SAM 2's high-resolution features, stored
    float16) atomically. Returns its path."""
    path = _embedding_path(Path(directory), model_version, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = BytesIO()
    extras = {f"extra{i}": e.detach().cpu().numpy().astype(np.float16) for i, e in enumerate(emb.extras)}
    np.savez(buf, features=emb.features.detach().cpu().numpy().astype(np.float16),
             original_size=np.asarray(emb.original_size), input_size=np.asarray(emb.input_size),
             image_id=np.asarray(image_id), **extras)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def load_embedding(directory: Path | str, model_version: str, image_id: str):
    """The precomputed ImageEmbedding of an image, or None if there is none (or it is unreadable)."""

    path = _embedding_path(Path(directory), model_version, image_id)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if str(z["image_id"]) != image_id:
                return None
            extras = tuple(torch.from_numpy(z[f"extra{i}"].astype(np.float32))
                           for i in range(sum(1 for k in z.files if k.startswith("extra"))))
            return ImageEmbedding(torch.from_numpy(z["features"].astype(np.float32)),
                                  tuple(int(v) for v in z["original_size"]), tuple(int(v) for v in z["input_size"]),
                                  extras)
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: unreadable precomputed embedding (%s); recomputing", path, e)
        return None


def precompute_embeddings(segmenter, images: list[tuple[str, np.ndarray]], directory: Path | str,
                          batch_size: int = 4) -> int:
    """Embed (image_id, (H, W, 3) uint8) pairs and save them for the backend. Skips existing ones.
    Pure per batch, so a Ray Data `map_batches` job can call it on shards of the image list."""
    todo = [(i, px) for i, px in images
            if not _embedding_path(Path(directory), segmenter.model_version, i).is_file()]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for (image_id, _), emb in zip(chunk, segmenter.embed([px for _, px in chunk])):
            save_embedding(directory, segmenter.model_version, image_id, emb)
    return len(todo)


class EmbeddingCache:
    """LRU of ImageEmbeddings by (model_version, image_id); reads precomputed ones first."""

    def __init__(self, segmenter, max_items: int = 64, precomputed_dir: Path | str | None = None):
        self.segmenter = segmenter
        self.max_items = max_items
        self.precomputed_dir = precomputed_dir
        self._items: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.hits = self.misses = self.precomputed = 0

    def get(self, image_id: str, load_pixels: Callable[[], np.ndarray]):
        key = (self.segmenter.model_version, image_id)
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        emb = None
        if self.precomputed_dir is not None:
            emb = load_embedding(self.precomputed_dir, *key)
            self.precomputed += emb is not None
        if emb is None:
            emb = self.segmenter.embed([load_pixels()])[0]
        self._items[key] = emb
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return emb


# --------------------------------------------------------------------------- prompts -> mask


@dataclass
class Prompt:
    """Prompts in pixels of the task image: points (K, 2) XY, labels (K,) 1/0, box XYXY or None."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None


def prompt_from_context(context: dict, height: int, width: int) -> Prompt:
    """Label Studio's interactive context -> pixel prompts. Raises ValueError if there is none."""
    pts, labs, box = [], [], None
    for r in (context or {}).get("result") or []:
        kind = str(r.get("type", "")).lower()
        v = r.get("value") or {}
        W = float(r.get("original_width") or width)
        H = float(r.get("original_height") or height)
        sx, sy = width / W, height / H  # the editor may report another size for the same image
        if kind == "keypointlabels":
            x = float(v["x"]) / 100.0 * W * sx - 0.5
            y = float(v["y"]) / 100.0 * H * sy - 0.5
            names = [str(n).lower() for n in v.get("keypointlabels") or []]
            positive = r.get("is_positive", True) and "negative" not in names
            pts.append((min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)))
            labs.append(1 if positive else 0)
        elif kind == "rectanglelabels":
            x0, y0 = float(v["x"]) / 100.0 * W * sx, float(v["y"]) / 100.0 * H * sy
            x1, y1 = x0 + float(v["width"]) / 100.0 * W * sx, y0 + float(v["height"]) / 100.0 * H * sy
            box = np.clip(np.array([x0, y0, x1, y1], np.float64), 0, [width, height, width, height])
    if not pts and box is None:
        raise ValueError("interactive context holds no keypoints or rectangles")
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
        with self._lock:
            emb = self.cache.get(image_id, load_pixels)
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
    """Basic (user sa-engine, password = token) or `Token`/`Bearer` with the token."""
    if not header or not token:
        return False
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme in ("token", "bearer"):
        return hmac.compare_digest(value.strip(), token)
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user, BASIC_USER) & hmac.compare_digest(password, token)
    return False


def predict_payload(state: BackendState, payload: dict) -> dict:
    """The body of a /predict answer."""
    params = payload.get("params") or {}
    tasks = payload.get("tasks") or []
    if not isinstance(params, dict) or not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ValueError("predict: 'params' must be an object and 'tasks' a list of objects")
    context = params.get("context")
    if not context or not (context.get("result") if isinstance(context, dict) else None):
        return {"results": []}  # batch predictions are imported by the stages, not made here

    results = []
    predictor = state.predictor  # once: a model switch during this request must not mix two models' answers
    phrase = text_from_context(context)
    if phrase is not None and not any(str(r.get("type", "")).lower() in ("keypointlabels", "rectanglelabels")
                                      for r in context.get("result") or []):
        return concept_payload(state, tasks, phrase)
    for task in tasks[:1]:  # interactive calls carry exactly one task
        data = task.get("data") or {}
        height, width = int(data["height"]), int(data["width"])
        prompt = prompt_from_context(context, height, width)
        image_id, load_pixels = state.image_loader(task)
        mask, score = predictor.predict(image_id, load_pixels, prompt)
        if mask.shape != (height, width):
            raise ValueError(f"task {task.get('id')}: image is {mask.shape[1]}x{mask.shape[0]}, "
                             f"task says {width}x{height}")
        results.append({"result": [brush_result(mask, height, width)], "score": score,
                        "model_version": predictor.model_version})
    state.predictions += len(results)
    return {"results": results}


def concept_payload(state: BackendState, tasks: list[dict], phrase: str) -> dict:
    """A text prompt: every instance of `phrase` as one brush region each, in one answer (best first)."""
    if state.concept is None:
        raise ValueError(f"text prompt {phrase!r}: this backend has no SAM 3 model (stages.concept.checkpoint)")
    results = []
    for task in tasks[:1]:
        data = task.get("data") or {}
        height, width = int(data["height"]), int(data["width"])
        image_id, load_pixels = state.image_loader(task)
        found = state.concept.predict(image_id, load_pixels, phrase)
        if found and found[0].mask.shape != (height, width):
            raise ValueError(f"task {task.get('id')}: image is {found[0].mask.shape[1]}x{found[0].mask.shape[0]}, "
                             f"task says {width}x{height}")
        regions = [brush_result(m.mask, height, width, meta={"text": [f"{phrase} {m.score:.2f}"]}) for m in found]
        results.append({"result": regions, "score": max((m.score for m in found), default=0.0),
                        "model_version": state.concept.model_version})
    state.predictions += len(results)
    return {"results": results}


def make_handler(state: BackendState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle on, the client's delayed ACK adds ~40 ms.
        disable_nagle_algorithm = True

        def log_message(self, fmt, *args):  # quiet: one line per error only
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _auth(self) -> bool:
            if authorized(self.headers.get("Authorization"), state.token):
                return True
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="sa-engine ml backend"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False

        def _body(self) -> dict:
            """The request's JSON object; ValueError (a 400) for a missing, negative or oversized length, a
            body that is not JSON or not an object."""
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise ValueError("Content-Length is not a number") from None
            if n < 0 or n > MAX_BODY_BYTES:
                self.close_connection = True  # the body is not read: the connection can't be reused
                raise ValueError(f"Content-Length {n}: must be 0..{MAX_BODY_BYTES}")
            body = json.loads(self.rfile.read(n) if n else b"{}")
            if not isinstance(body, dict):
                raise ValueError(f"body must be a JSON object, got {type(body).__name__}")
            return body

        def do_GET(self):
            if not self._auth():
                return
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/health", ""):
                self._send(200, {"status": "UP", "model_class": "sa-engine", "model_version":
                                 state.predictor.model_version, "predictions": state.predictions})
            else:
                self._send(404, {"error": f"no such endpoint {path}"})

        def do_POST(self):
            if not self._auth():
                return
            path = self.path.split("?")[0].rstrip("/")
            try:
                body = self._body()
            except ValueError as e:
                self._send(400, {"error": f"bad request: {e}"})
                return
            try:
                if path == "/setup":
                    state.ls_hostname = body.get("hostname") or state.ls_hostname
                    state.ls_access_token = body.get("access_token") or state.ls_access_token
                    self._send(200, {"model_version": state.predictor.model_version})
                elif path == "/predict":
                    t = time.perf_counter()
                    out = predict_payload(state, body)
                    state.timings_ms.append((time.perf_counter() - t) * 1e3)
                    del state.timings_ms[:-1000]
                    self._send(200, out)
                elif path == "/webhook":
                    state.webhooks += 1
                    self._send(200, {"status": "ok"})
                elif path == "/health":
                    self._send(200, {"status": "UP"})
                else:
                    self._send(404, {"error": f"no such endpoint {path}"})
            except (ValueError, KeyError, TypeError) as e:
                state.last_error = f"{path}: {type(e).__name__}: {e}"
                log.warning("ML backend %s", state.last_error)
                self._send(400, {"error": state.last_error})
            except Exception as e:  # a failed prediction must not take the server down
                state.last_error = f"{path}: {type(e).__name__}: {e}"
                log.exception("ML backend %s", path)
                self._send(500, {"error": state.last_error})

    return Handler


MAX_BODY_BYTES = 64 * 2**20  # Label Studio inlines a task's annotations and predictions: generous, bounded


def is_loopback(host: str) -> bool:
    """A literal loopback address or `localhost` ("" and 0.0.0.0 mean every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MLBackend:
    """The HTTP server on 127.0.0.1 (by default), in a background thread or in the foreground."""

    def __init__(self, state: BackendState, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False):
        if not allow_remote and not is_loopback(host):
            raise ValueError(f"ml backend: refusing to listen on {host!r} (not a loopback address); "
                             "--allow-remote serves other machines (the token still guards every request)")
        self.state = state
        self.httpd = ThreadingHTTPServer((host, port), make_handler(state))
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MLBackend":
        if self._thread is not None:  # already serving (start() then `with`): a second loop would outlive stop()
            return self
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="sa-engine-ml-backend",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "MLBackend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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
        self.state.predictor = MaskPredictor(segmenter, EmbeddingCache(segmenter, precomputed_dir=self.precomputed_dir))
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
            # redirects followed only on the configured Label Studio: the token never reaches another hop
            with open_on_origin(full, trusted_ls_url, {"Authorization": f"Token {token}"} if token else {},
                                timeout=30) as r:
                raw = r.read(MAX_IMAGE_BYTES + 1)
            if len(raw) > MAX_IMAGE_BYTES:
                raise ValueError(f"task {task.get('id')}: image at {full} is over {MAX_IMAGE_BYTES >> 20} MiB")
            return decode_image(raw, full)  # the stages' decoder: the same pixels as the store's copy

        return image_id or url, fetch

    return loader
