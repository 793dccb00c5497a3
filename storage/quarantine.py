"""Set-aside inputs: what could not be used, why, and by which stage.

Every `Quarantine` writes its own `quarantine/<uuid>.jsonl` under the store root (one JSON object a
line: thing, reason, stage, time), rewritten atomically on each `add`, so concurrent workers never
write the same object and a crash loses at most the entry being added. `entries()` reads them all.
"""
from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone

from storage.backend import Store, open_store

QUARANTINE_DIR = "quarantine"
log = logging.getLogger("sa_engine.quarantine")


class Quarantine:
    """The quarantine record under `store_uri` (a local folder or s3://bucket/prefix)."""

    def __init__(self, store_uri: str, s3_endpoint_url: str | None = None, store: Store | None = None):
        self.store = store or open_store(store_uri, s3_endpoint_url=s3_endpoint_url)
        self.key = f"{QUARANTINE_DIR}/{uuid.uuid4().hex}.jsonl"
        self._mine: list[dict] = []

    def __getstate__(self) -> dict:  # each process that unpickles one gets its own file
        state = dict(self.__dict__)
        state["key"] = f"{QUARANTINE_DIR}/{uuid.uuid4().hex}.jsonl"
        state["_mine"] = []
        return state

    def add(self, thing: str, reason: str, stage: str) -> dict:
        """Set `thing` (an image URI, a task id, …) aside with a one-line reason; logs a warning."""
        entry = {"thing": str(thing), "reason": " ".join(str(reason).split()), "stage": stage,
                 "time": datetime.now(timezone.utc).isoformat()}
        self._mine.append(entry)
        self.store.write_bytes(self.key, "".join(json.dumps(e) + "\n" for e in self._mine).encode())
        log.warning("quarantined %s (%s): %s", entry["thing"], stage, entry["reason"])
        return entry

    def entries(self) -> list[dict]:
        """All entries of every writer, oldest first; a thing set aside again for the same reason
        and stage (a re-run) is listed once."""
        seen, out = set(), []
        rows = []
        for key in self.store.list(QUARANTINE_DIR):
            if not key.endswith(".jsonl"):
                continue
            for line in self.store.read_bytes(key).decode("utf-8", "replace").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a damaged line must not hide the others
        for e in sorted(rows, key=lambda e: e.get("time", "")):
            ident = (e.get("thing"), e.get("reason"), e.get("stage"))
            if ident not in seen:
                seen.add(ident)
                out.append(e)
        return out

    def things(self, stage: str | None = None) -> set[str]:
        """What was set aside (by `stage`, if given): lets a re-run skip known bad inputs."""
        return {e["thing"] for e in self.entries() if stage is None or e.get("stage") == stage}
