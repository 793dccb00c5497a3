"""The round loop's ledger (`<workdir>/ledger.jsonl`): one JSON line per step, rewritten atomically, and the
work dir's lock (engine/rounds.py: how the loop uses them)."""

import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np



LEDGER_FILE = "ledger.jsonl"
LEDGER_VERSION = 1
DONE, STARTED, FAILED, INTERRUPTED = "done", "started", "failed", "interrupted"


class LedgerError(RuntimeError):
    """The ledger can't be used as it is (corrupt, locked, or disagrees with the plan); one line."""


class StepFailed(RuntimeError):
    """A step raised; the message is one line naming the step and the reason."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars/arrays, paths, sets and tuples turned into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no NaN/inf; the report shows a missing value
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}" if not isinstance(e, (ValueError, RuntimeError, OSError)) else text


class Ledger:
    """The round ledger: an ordered list of step records kept in one JSON-lines file.

    Record fields: step (id, e.g. "r2.train"), kind (select|manual|semi|auto|train|eval|promote|
    init|bootstrap), round, status (started|done|failed|interrupted), inputs, outputs, error,
    attempts, started_at, finished_at (ISO UTC), seconds (wall time of the last attempt).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LedgerError(f"{self.path}:{n}: not valid JSON ({e.msg})") from None
                if "step" not in rec or "status" not in rec:
                    raise LedgerError(f"{self.path}:{n}: a ledger line needs 'step' and 'status'")
                self._records[rec["step"]] = rec

    def entries(self) -> list[dict]:
        return list(self._records.values())

    def get(self, step: str) -> dict | None:
        return self._records.get(step)

    def is_done(self, step: str) -> bool:
        rec = self._records.get(step)
        return rec is not None and rec["status"] == DONE

    def begin(self, step: str, kind: str, round: int, inputs: dict) -> None:
        prev = self._records.get(step, {})
        self._records[step] = {
            "step": step, "kind": kind, "round": round, "status": STARTED,
            "inputs": _jsonable(inputs), "outputs": None, "error": None,
            "attempts": prev.get("attempts", 0) + 1, "started_at": _now(), "finished_at": None,
            "seconds": None,
        }
        self._write()

    def finish(self, step: str, outputs: dict, seconds: float) -> dict:
        """Commit a step; returns the outputs as stored (JSON round-tripped)."""
        stored = json.loads(json.dumps(_jsonable(outputs)))
        self._records[step].update(status=DONE, outputs=stored, finished_at=_now(),
                                   seconds=round(seconds, 3))
        self._write()
        return stored

    def fail(self, step: str, error: str, seconds: float, status: str = FAILED) -> None:
        self._records[step].update(status=status, error=error, finished_at=_now(),
                                   seconds=round(seconds, 3))
        self._write()

    def _write(self) -> None:
        """Replace the file atomically: write a temp file beside it, fsync, rename, fsync the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in self._records.values())
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class WorkdirLock:
    """An exclusive lock on a work dir, so two runs never write one ledger (released by the OS on kill)."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / ".sa-engine.lock"
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LedgerError(f"{self.path.parent}: another sa-engine run is using this work dir "
                              f"(pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
