"""The Label Studio edge: the managed server (its own virtualenv) and every SDK call, in project types.

Nothing else in the project imports `label_studio_sdk` (except the brush RLE parity tests).

Server lifecycle
    Label Studio's pins clash with ours (pyarrow<25, Django, ...), so it lives in its own virtualenv:
    `$SA_ENGINE_LS_VENV`, default `$SA_ENGINE_HOME/label-studio-<version>-venv` with `SA_ENGINE_HOME`
    defaulting to `~/.cache/sa-engine`. `ensure_installed()` creates it with `python -m venv` + pip on
    first use (about 1 GB, minutes); a marker file written last makes it idempotent, a lock file makes
    concurrent first uses safe. `start_server()` runs it headless on 127.0.0.1 (never 0.0.0.0) with
    SQLite, an admin user and a legacy API token under a data directory, records the PID and waits for
    `/health`; `stop_server()` stops it by that PID. To use an existing server instead, give
    `labelstudio.managed: false`, `url` and `token` (env SA_ENGINE_LS_TOKEN) and skip the lifecycle.

Projects, tasks, predictions, annotations
    `LabelStudio` wraps the SDK client. Masks cross this edge as `(H, W) bool` arrays and leave it
    as brush RLE results (storage/brush_rle.py); prompts as pixel coordinates. Every call retries
    with backoff when the server is unreachable, then raises `LabelStudioUnavailable` (one line).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

LS_VERSION = "1.23.2"
_MARKER = ".sa-engine-installed"


class LabelStudioError(RuntimeError):
    """A Label Studio problem the user can act on; the message is one line."""


class LabelStudioUnavailable(LabelStudioError):
    """The server did not answer (after retries)."""


# --------------------------------------------------------------------------- installation


def engine_home() -> Path:
    """`$SA_ENGINE_HOME`, default `~/.cache/sa-engine`: per-user state shared by all work dirs."""
    return Path(os.environ.get("SA_ENGINE_HOME") or Path.home() / ".cache" / "sa-engine")


def venv_dir() -> Path:
    """Where Label Studio's own virtualenv lives (`$SA_ENGINE_LS_VENV` overrides)."""
    override = os.environ.get("SA_ENGINE_LS_VENV")
    return Path(override) if override else engine_home() / f"label-studio-{LS_VERSION}-venv"


def is_installed(venv: Path | None = None) -> bool:
    venv = venv or venv_dir()
    return (venv / _MARKER).is_file() and (venv / "bin" / "label-studio").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_installed(venv: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Install label-studio==LS_VERSION into its own virtualenv if it is not there yet.

    Returns the path of the `label-studio` executable. Idempotent and safe to call concurrently.
    A half-finished install (no marker) is wiped and redone.
    """
    venv = venv or venv_dir()
    exe = venv / "bin" / "label-studio"
    if is_installed(venv):
        return exe
    with _file_lock(venv.parent / f".{venv.name}.lock"):
        if is_installed(venv):
            return exe
        if venv.exists():
            shutil.rmtree(venv)
        log(f"installing label-studio=={LS_VERSION} into {venv} (first use; a few minutes)")
        base_python = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
        logfile = venv.parent / f"{venv.name}-install.log"
        with open(logfile, "w") as out:
            for cmd in ([base_python, "-m", "venv", str(venv)],
                        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                         f"label-studio=={LS_VERSION}"]):
                rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
                if rc != 0:
                    raise LabelStudioError(
                        f"installing label-studio into {venv} failed (exit {rc}); see {logfile}")
        if not exe.is_file():
            raise LabelStudioError(f"{exe}: not found after installing label-studio; see {logfile}")
        (venv / _MARKER).write_text(LS_VERSION + "\n")
        log(f"label-studio {LS_VERSION} installed in {venv}")
    return exe


# --------------------------------------------------------------------------- server lifecycle


@dataclass
class ServerSettings:
    """How to run the managed server. data_dir holds SQLite, media, logs, the PID and credentials."""

    data_dir: Path
    port: int = 8089
    username: str = "admin@sa-engine.local"
    password: str | None = None  # generated and kept in data_dir/credentials.json if None
    token: str | None = None  # 40 hex chars; generated likewise if None
    document_root: Path | None = None  # local-file serving root (the image folder's ancestor)
    ml_backend_local: bool = True  # allow an ML backend on loopback (turns SSRF protection off)


@dataclass
class ServerInfo:
    url: str
    token: str
    pid: int | None
    port: int
    data_dir: str
    username: str = ""
    managed: bool = True


def _pid_file(data_dir: Path) -> Path:
    return Path(data_dir) / "server.json"


def _credentials(settings: ServerSettings) -> tuple[str, str]:
    """(password, token): env > settings > previously generated ones (data_dir/credentials.json)."""
    path = Path(settings.data_dir) / "credentials.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    token = os.environ.get("SA_ENGINE_LS_TOKEN") or settings.token or saved.get("token") or secrets.token_hex(20)
    password = (os.environ.get("SA_ENGINE_LS_PASSWORD") or settings.password or saved.get("password")
                or secrets.token_urlsafe(16))
    if saved.get("token") and saved["token"] != token:
        # The token is bound to the admin user when the database is first created.
        raise LabelStudioError(f"{path}: the configured Label Studio token differs from the one this "
                               "data directory was created with; unset it or use a new data directory")
    if len(token) != 40 or any(c not in "0123456789abcdef" for c in token.lower()):
        raise LabelStudioError("labelstudio.token: must be 40 hex characters (a legacy API token)")
    if not saved:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"token": token, "password": password}))
        tmp.chmod(0o600)
        os.replace(tmp, path)
    return password, token


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def server_status(data_dir: Path) -> dict:
    """{"running": bool, "healthy": bool, "pid", "url", "port", "log"} for the managed server."""
    pf = _pid_file(data_dir)
    if not pf.is_file():
        return {"running": False, "healthy": False, "pid": None, "url": None, "port": None}
    info = json.loads(pf.read_text())
    alive = _pid_alive(info["pid"])
    return {"running": alive, "healthy": alive and health_ok(info["url"]), "pid": info["pid"],
            "url": info["url"], "port": info["port"], "log": info.get("log")}


def server_env(settings: ServerSettings, password: str, token: str) -> dict[str, str]:
    """The environment the server runs with (see FIELD-NOTES: each one is needed)."""
    data_dir = Path(settings.data_dir).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "LABEL_STUDIO_"))}
    env.pop("VIRTUAL_ENV", None)
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_USERNAME": settings.username,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        # Without this the token above is refused with 401.
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(Path(settings.document_root or "/").resolve()),
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "PYTHONUNBUFFERED": "1",
    })
    if settings.ml_backend_local:
        # Label Studio refuses ML backends on loopback otherwise; the second also guards the
        # webhook it creates towards the backend.
        env["ML_BLOCK_LOCAL_IP"] = "false"
        env["SSRF_PROTECTION_ENABLED"] = "false"
    return env


def start_server(settings: ServerSettings, wait_s: float = 240.0,
                 log: Callable[[str], None] = print) -> ServerInfo:
    """Start the managed server (installing it first if needed) and wait for `/health`.

    Calling it while our server is already up returns the running one. Raises LabelStudioError
    if the port is taken by something else or the server does not come up in `wait_s`.
    """
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    password, token = _credentials(settings)
    url = f"http://127.0.0.1:{settings.port}"
    with _file_lock(data_dir / ".server.lock"):
        st = server_status(data_dir)
        if st["running"]:
            if st["port"] != settings.port:
                raise LabelStudioError(f"{data_dir}: a server for this data directory already runs on "
                                       f"port {st['port']} (pid {st['pid']}); stop it first")
            if not _wait_healthy(st["url"], st["pid"], wait_s):
                raise LabelStudioError(f"Label Studio (pid {st['pid']}) runs but {st['url']}/health "
                                       f"does not answer; see {st.get('log')}")
            return ServerInfo(url=st["url"], token=token, pid=st["pid"], port=settings.port,
                              data_dir=str(data_dir), username=settings.username)
        if not port_is_free(settings.port):
            raise LabelStudioError(f"port {settings.port} on 127.0.0.1 is in use by another program; "
                                   "set labelstudio.port to a free one")
        exe = ensure_installed(log=log)
        logfile = data_dir / "server.log"
        cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
               "--port", str(settings.port), "--data-dir", str(data_dir)]
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(cmd, env=server_env(settings, password, token), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(data_dir), start_new_session=True)
        tmp = _pid_file(data_dir).with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "port": settings.port, "url": url,
                                   "log": str(logfile), "started_at": time.time()}))
        os.replace(tmp, _pid_file(data_dir))
        log(f"Label Studio starting on {url} (pid {proc.pid}, log {logfile})")
        if not _wait_healthy(url, proc.pid, wait_s):
            alive = _pid_alive(proc.pid)
            stop_server(data_dir)
            reason = "did not answer /health in time" if alive else "exited during start"
            raise LabelStudioError(f"Label Studio {reason}; see {logfile}")
    return ServerInfo(url=url, token=token, pid=proc.pid, port=settings.port, data_dir=str(data_dir),
                      username=settings.username)


def _wait_healthy(url: str, pid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if health_ok(url):
            return True
        if not _pid_alive(pid):
            return False
        time.sleep(0.5)
    return False


def stop_server(data_dir: Path, timeout_s: float = 20.0) -> bool:
    """Stop the managed server by its recorded PID (its process group: it was started in a session
    of its own). Returns True if one was running."""
    pf = _pid_file(Path(data_dir))
    if not pf.is_file():
        return False
    pid = json.loads(pf.read_text())["pid"]
    was_running = _pid_alive(pid)
    if was_running:
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _pid_alive(pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.2)
            if not _pid_alive(pid):
                break
    pf.unlink(missing_ok=True)
    return was_running
