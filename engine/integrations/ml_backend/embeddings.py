"""Image embeddings for the ML backend: saved per (model version, image) by a batch job, and an LRU cache that
reads them first, embeds the rest once each (thread-safe) and can embed images ahead of their first click."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from io import BytesIO
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.segmenter import ImageEmbedding

log = logging.getLogger(__name__)


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
    """LRU of ImageEmbeddings by (model_version, image_id); reads precomputed ones first. Thread-safe: requests
    for different images embed at the same time, two requests for the same image embed it once (the second
    waits for the first). `prefetch` embeds images ahead in a background thread, in the order given (the most
    likely next first), up to the cache's size: the first click on those images then costs a decoder pass."""

    def __init__(self, segmenter, max_items: int = 64, precomputed_dir: Path | str | None = None):
        self.segmenter = segmenter
        self.max_items = max_items
        self.precomputed_dir = precomputed_dir
        self._items: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], threading.Event] = {}
        self._loaders: OrderedDict[str, Callable[[], np.ndarray]] = OrderedDict()  # by image id, last used last
        self._queue: list[tuple[str, Callable[[], np.ndarray]]] = []
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._closed = False
        self._working = False
        self.hits = self.misses = self.precomputed = self.prefetched = 0

    def __contains__(self, image_id: str) -> bool:
        with self._lock:
            return (self.segmenter.model_version, image_id) in self._items

    def loaders(self) -> list[tuple[str, Callable[[], np.ndarray]]]:
        """(image_id, pixel loader) of the images asked for lately, most recent first (what a new model's cache
        should embed ahead)."""
        with self._lock:
            return list(reversed(self._loaders.items()))

    def get(self, image_id: str, load_pixels: Callable[[], np.ndarray], count: bool = True):
        key = (self.segmenter.model_version, image_id)
        while True:
            with self._lock:
                self._loaders[image_id] = load_pixels
                self._loaders.move_to_end(image_id)
                while len(self._loaders) > self.max_items:
                    self._loaders.popitem(last=False)
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += count
                    return self._items[key]
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
                    self.misses += count
                    break
            waiting.wait()  # another thread embeds this image; then it is cached (or failed: try ourselves)
        try:
            emb = None
            if self.precomputed_dir is not None:
                emb = load_embedding(self.precomputed_dir, *key)
            if emb is None:
                emb = self.segmenter.embed([load_pixels()])[0]
            else:
                self.precomputed += 1  # read from disk, for a click or ahead of one
            with self._lock:
                self._items[key] = emb
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
            return emb
        finally:
            with self._lock:
                self._pending.pop(key).set()

    def prefetch(self, images: list[tuple[str, Callable[[], np.ndarray]]]) -> int:
        """Embed these (image_id, pixel loader) pairs ahead, in this order, replacing any earlier wish list;
        at most `max_items` of them (the cache's budget: what is embedded ahead is not evicted by what is
        embedded after it). Returns how many are queued (the ones not cached yet)."""
        with self._lock:
            version = self.segmenter.model_version
            todo = [(i, load) for i, load in images[: self.max_items] if (version, i) not in self._items]
            self._queue = todo
            if self._worker is None and todo:
                self._worker = threading.Thread(target=self._prefetch_loop, name="ml-backend-prefetch", daemon=True)
                self._worker.start()
            self._wake.notify()
            return len(todo)

    def _prefetch_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                image_id, load = self._queue.pop(0)
                self._working = True
            try:
                self.get(image_id, load, count=False)
                self.prefetched += 1
            except Exception as e:  # an image that can't be read is the click's problem, reported there
                log.warning("prefetch %s: %s", image_id, " ".join(str(e).split())[:200])
            finally:
                with self._lock:
                    self._working = False

    def pending_prefetch(self) -> int:
        """Images still to embed ahead (the one being embedded now included)."""
        with self._lock:
            return len(self._queue) + self._working

    def close(self) -> None:
        """Stop the prefetch thread (the cache itself stays usable)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
