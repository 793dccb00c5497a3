"""Output targets (staged, then published atomically locally or index-last on S3) and the frame every export runs in."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from storage.backend import open_store
from storage.exports.common import (
    INDEX_NAME,
    MARKER_NAME,
    OutputExistsError,
)
from storage.exports.plan import (
    ExportFilters,
    _Plan,
    build_plan,
)
from storage.records import SCHEMA_VERSION
from storage.shards import MaskStore

log = logging.getLogger("storage.exports")

# ----------------------------------------------------------------------------------------------------------
# Output targets: staged, then published atomically (local) or index-last (S3)


def _is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


class _Target(ABC):
    """Where an export goes: `check` (refuse an existing output), `begin`, `put` files, `publish` the index.

    Files are produced in `scratch` (a local folder) and handed over with `put(rel, local_path)`.
    """

    scratch: Path

    @abstractmethod
    def check(self, overwrite: bool) -> None:
        ...

    @abstractmethod
    def begin(self, marker: dict) -> None:
        ...

    @abstractmethod
    def put(self, rel: str, local_path: Path) -> None:
        ...

    @abstractmethod
    def publish(self, index: dict) -> None:
        ...

    @abstractmethod
    def abort(self) -> None:
        ...


class _LocalTarget(_Target):
    """A local folder. Everything is written into a sibling staging folder, then swapped in by rename."""

    def __init__(self, out: str):
        self.out = Path(out).resolve()
        self.staging = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.scratch = self.staging / ".scratch"

    def check(self, overwrite: bool) -> None:
        if not self.out.exists():
            return
        if self.out.is_dir() and not any(self.out.iterdir()):
            return
        if not overwrite:
            raise OutputExistsError(f"{self.out}: output exists; pass --overwrite to replace it")
        if not (self.out.is_dir() and (self.out / MARKER_NAME).exists()):
            raise OutputExistsError(f"{self.out}: exists and is not an sa-engine export; not replacing it")

    def begin(self, marker: dict) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True)
        (self.staging / MARKER_NAME).write_text(json.dumps(marker))

    def put(self, rel: str, local_path: Path) -> None:
        dest = self.staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, dest)

    def publish(self, index: dict) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        tmp = self.staging / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.staging / INDEX_NAME)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class _S3Target(_Target):
    """An s3:// prefix, through storage.backend. The old index goes first, stale objects next, the new index last."""

    def __init__(self, out: str, s3_endpoint_url: str | None, s3_region: str | None = None):

        self.uri = out.rstrip("/")
        self.store = open_store(self.uri, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
        self.scratch = Path(tempfile.mkdtemp(prefix="sa-export-"))
        self.written: set[str] = set()
        self.old_keys: list[str] = []

    def check(self, overwrite: bool) -> None:
        existing = self.store.list("")  # hidden keys (our marker) are not listed
        ours = self.store.exists(MARKER_NAME)
        if not existing and not ours:
            return
        if not overwrite:
            raise OutputExistsError(f"{self.uri}: output exists; pass --overwrite to replace it")
        if not ours:
            raise OutputExistsError(f"{self.uri}: exists and is not an sa-engine export; not replacing it")
        self.old_keys = existing

    def begin(self, marker: dict) -> None:
        # From here on the old export is no longer complete: readers see no index until ours is written.
        self.store.delete(INDEX_NAME)
        self.store.write_bytes(MARKER_NAME, json.dumps(marker).encode())
        self.written.add(MARKER_NAME)

    def put(self, rel: str, local_path: Path) -> None:
        self.store.write_file(rel, local_path)  # multipart when large: the tar is never held in memory
        self.written.add(rel)
        Path(local_path).unlink()

    def publish(self, index: dict) -> None:
        for key in self.old_keys:
            if key not in self.written and key != INDEX_NAME:
                self.store.delete(key)
        self.store.write_bytes(INDEX_NAME, json.dumps(index, indent=1).encode())
        shutil.rmtree(self.scratch, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def collect_export_garbage(out: str, min_age_s: float = 3600.0) -> list[str]:
    """Delete what killed exports to the local folder `out` left: its staging and old-copy siblings
    (".<name>.tmp-*", ".<name>.old-*") and this machine's S3 export scratch folders (sa-export-* in the
    temp dir), older than `min_age_s`. Returns the deleted paths."""
    now, deleted = time.time(), []
    candidates = list(Path(tempfile.gettempdir()).glob("sa-export-*"))
    if not _is_s3(out):
        target = Path(out).resolve()
        candidates += list(target.parent.glob(f".{target.name}.tmp-*")) + list(target.parent.glob(f".{target.name}.old-*"))
    for path in candidates:
        try:
            if path.is_dir() and now - path.stat().st_mtime >= min_age_s:
                shutil.rmtree(path, ignore_errors=True)
                deleted.append(str(path))
        except OSError:
            continue
    return deleted


def _open_target(out: str, s3_endpoint_url: str | None, s3_region: str | None = None) -> _Target:
    return _S3Target(out, s3_endpoint_url, s3_region) if _is_s3(out) else _LocalTarget(out)



# ----------------------------------------------------------------------------------------------------------
# The exports


def _split_prefix(split: str, splits: dict[str, float]) -> str:
    """Tars of a single-split export sit at the top (SA-1B's flat layout); with several, one folder each."""
    return "" if len(splits) == 1 else f"{split}/"


def _marker(fmt: str, filters: ExportFilters, splits: dict[str, float]) -> dict:
    return {"format": fmt, "started_at": datetime.now(timezone.utc).isoformat(), "filters": filters.to_json(),
            "splits": splits}


def _run_export(fmt: str, out: str, overwrite: bool, s3_endpoint_url: str | None,
                body: Callable[[_Target, _Plan], dict], filters: ExportFilters, splits: dict[str, float],
                store: "MaskStore", s3_region: str | None = None) -> dict:
    """Shared frame: refuse an existing output, verify the store, plan, run `body`, publish the index last.

    Everything that can refuse the export (existing output, corrupt shard, empty selection) is decided
    before the first write, so a refused export leaves the old output untouched, on S3 too.
    """
    target = _open_target(out, s3_endpoint_url, s3_region)
    target.check(overwrite)
    started = time.perf_counter()
    store.verify()  # a shard failing its checksum stops the export before anything is written
    plan = build_plan(store, filters, splits)  # raises EmptySelectionError
    try:
        target.begin(_marker(fmt, filters, splits))
        index = body(target, plan)
        index.update({"format": fmt, "schema_version": SCHEMA_VERSION,
                      "created_at": datetime.now(timezone.utc).isoformat(),
                      "filters": filters.to_json(), "splits": splits})
        target.publish(index)
    except BaseException:
        target.abort()
        raise
    seconds = time.perf_counter() - started
    summary = {k: v for k, v in index.items() if k != "files"}
    summary.update({"out": out, "files": len(index["files"]), "seconds": round(seconds, 3),
                    "images_per_s": index["images"] / max(seconds, 1e-9),
                    "masks_per_s": index["masks"] / max(seconds, 1e-9)})
    return summary
