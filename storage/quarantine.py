"""Set-aside inputs: what could not be used, why, by which stage, and whether trying again may help.

Every `Quarantine` writes its own `quarantine/<uuid>.jsonl` under the store root (one JSON object a
line), rewritten atomically on each event, so concurrent workers never write the same object and a
crash loses at most the event being added. Two kinds of event:

    {"thing", "reason", "stage", "kind": "transient" | "permanent", "time"}   set aside
    {"thing", "stage", "released": true, "time"}                               released by a person

Retry policy. A *permanent* entry (not an image, a decompression bomb, too large) is skipped by every
rerun until it is released (`sa-engine quarantine release`). A *transient* one (the file was missing,
unreadable or half-written — NFS, S3, a copy in progress —, or the model ran out of memory) is tried
again by the next run, up to `retries` times; after that it is held like a permanent one, until
released. A release forgets the thing's earlier entries, so a released thing starts afresh.
"""
from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone

from storage.backend import Store, open_store

QUARANTINE_DIR = "quarantine"
KINDS = ("transient", "permanent")
DEFAULT_RETRIES = 3
log = logging.getLogger("sa_engine.quarantine")


class Quarantine:
    """The quarantine record under `store_uri` (a local folder or s3://bucket/prefix).

    retries: how many times a thing set aside as transient is tried again before it is held."""

    def __init__(self, store_uri: str, s3_endpoint_url: str | None = None, store: Store | None = None,
                 retries: int = DEFAULT_RETRIES):
        self.store = store or open_store(store_uri, s3_endpoint_url=s3_endpoint_url)
        self.retries = int(retries)
        self.key = f"{QUARANTINE_DIR}/{uuid.uuid4().hex}.jsonl"
        self._mine: list[dict] = []

    def __getstate__(self) -> dict:  # each process that unpickles one gets its own file
        state = dict(self.__dict__)
        state["key"] = f"{QUARANTINE_DIR}/{uuid.uuid4().hex}.jsonl"
        state["_mine"] = []
        return state

    def _append(self, event: dict) -> None:
        self._mine.append(event)
        self.store.write_bytes(self.key, "".join(json.dumps(e) + "\n" for e in self._mine).encode())

    def add(self, thing: str, reason: str, stage: str, kind: str = "permanent") -> dict:
        """Set `thing` (an image URI, a task id, …) aside with a one-line reason; logs a warning."""
        if kind not in KINDS:
            raise ValueError(f"quarantine kind {kind!r}: expected one of {KINDS}")
        entry = {"thing": str(thing), "reason": " ".join(str(reason).split()), "stage": stage, "kind": kind,
                 "time": datetime.now(timezone.utc).isoformat()}
        self._append(entry)
        log.warning("quarantined %s (%s, %s): %s", entry["thing"], stage, kind, entry["reason"])
        return entry

    def _events(self) -> list[dict]:
        rows = []
        for key in self.store.list(QUARANTINE_DIR):
            if not key.endswith(".jsonl"):
                continue
            for line in self.store.read_bytes(key).decode("utf-8", "replace").splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a damaged line must not hide the others
                if isinstance(e, dict) and "thing" in e:
                    rows.append(e)
        return sorted(rows, key=lambda e: e.get("time", ""))

    def status(self) -> list[dict]:
        """One row per (thing, stage) still set aside, oldest first: the latest entry's thing, reason,
        stage, kind and time, plus `attempts` (entries since the last release) and `held` (a rerun skips
        it: permanent, or transient `retries` times)."""
        current: dict[tuple, dict] = {}
        for e in self._events():
            ident = (e["thing"], e.get("stage"))
            if e.get("released"):
                current.pop(ident, None)
                continue
            kind = e.get("kind", "permanent")  # entries written before kinds existed were never retried
            row = current.pop(ident, {"attempts": 0})  # re-inserted: ordered by the latest entry
            row.update(thing=e["thing"], reason=e.get("reason", ""), stage=e.get("stage"), kind=kind,
                       time=e.get("time", ""), attempts=row["attempts"] + 1)
            row["held"] = kind == "permanent" or row["attempts"] > self.retries
            current[ident] = row
        return list(current.values())

    def entries(self) -> list[dict]:
        """What is set aside now (see `status`); a thing set aside again for the same reason and stage
        (a rerun) is listed once."""
        return self.status()

    def things(self, stage: str | None = None) -> set[str]:
        """What a rerun of `stage` skips: entries held (permanent, or transient past `retries`)."""
        return {e["thing"] for e in self.status() if e["held"] and (stage is None or e.get("stage") == stage)}

    def retrying(self, stage: str | None = None) -> set[str]:
        """Transient entries a rerun of `stage` tries again."""
        return {e["thing"] for e in self.status() if not e["held"] and (stage is None or e.get("stage") == stage)}

    def release(self, things: list[str] | None = None, stage: str | None = None) -> list[dict]:
        """Release what is set aside (every entry when `things` is None; only `stage`'s when given), so the
        next run tries it again. Returns the released rows."""
        wanted = None if things is None else {str(t) for t in things}
        released = [e for e in self.status()
                    if (wanted is None or e["thing"] in wanted) and (stage is None or e.get("stage") == stage)]
        for e in released:
            self._append({"thing": e["thing"], "stage": e.get("stage"), "released": True,
                          "time": datetime.now(timezone.utc).isoformat()})
        return released
