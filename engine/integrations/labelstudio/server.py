"""The managed Label Studio server: installed in its own virtualenv, started headless on 127.0.0.1, stopped by PID
(see the package's docstring)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import re
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from engine.integrations.labelstudio import postgres
from engine.integrations.labelstudio.errors import LabelStudioError


LS_VERSION = "1.23.2"
_MARKER = ".sa-engine-installed"



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


_DB_NAME = "label_studio.sqlite3"


def database_template(venv: Path | None = None, log: Callable[[str], None] = print) -> Path | None:
    """An empty Label Studio database with every migration applied and no user, made once per install (beside
    it in the venv) and copied into each new data directory: a first start then takes seconds instead of the
    half minute (minutes on a busy machine) its migrations cost. The admin user and token are created at each
    server's own first start, as before. None if it can't be made: the server then migrates as it always did."""
    venv = venv or venv_dir()
    folder = venv / "sa-engine-empty-database"
    if (folder / _DB_NAME).is_file():
        return folder / _DB_NAME
    exe = ensure_installed(venv, log=log)
    with _file_lock(venv.parent / f".{venv.name}-database.lock"):
        if (folder / _DB_NAME).is_file():
            return folder / _DB_NAME
        work = venv / f".empty-database-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "LABEL_STUDIO_"))}
        env.pop("VIRTUAL_ENV", None)
        env.update({"LABEL_STUDIO_BASE_DATA_DIR": str(work), "DJANGO_DB": "sqlite", "SENTRY_DSN": "",
                    "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false"})
        log("Label Studio: migrating an empty database once for this install (later first starts copy it)")
        # `version` applies the migrations and prints the version: no server, no user.
        with open(work / "migrate.log", "wb") as out:
            rc = subprocess.call([str(exe), "version", "--data-dir", str(work)], env=env, cwd=str(work),
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if rc != 0 or not (work / _DB_NAME).is_file():
            log(f"Label Studio: could not prepare an empty database (exit {rc}; see {work / 'migrate.log'}); "
                "each first start migrates its own")
            return None
        folder.mkdir(exist_ok=True)
        os.replace(work / _DB_NAME, folder / _DB_NAME)
        shutil.rmtree(work, ignore_errors=True)
    return folder / _DB_NAME


def _seed_database(data_dir: Path, log: Callable[[str], None]) -> None:
    """Give a new data directory the migrated empty database (atomically; an existing database is kept)."""
    target = data_dir / _DB_NAME
    if target.exists():
        return
    template = database_template(log=log)
    if template is None:
        return
    tmp = target.with_name(f".{_DB_NAME}.{os.getpid()}.tmp")
    shutil.copyfile(template, tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, target)


# --------------------------------------------------------------------------- server lifecycle


@dataclass
class ServerSettings:
    """How to run the managed server. data_dir holds SQLite, media, logs, the PID and credentials."""

    data_dir: Path
    port: int = 8089
    username: str = "admin@sa-engine.local"
    password: str | None = None  # generated and kept in data_dir/credentials.json if None
    token: str | None = None  # 40 hex chars; generated likewise if None
    document_root: Path | None = None  # local-file serving root (default: data_dir, i.e. nothing else)
    ml_backend_local: bool = True  # allow an ML backend on loopback (turns SSRF protection off)
    database: str = "sqlite"  # "sqlite" (one person) or "postgresql" (a team: postgres.py)
    database_url: str | None = None  # postgresql://…: an existing database; None: a managed local cluster


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
        write_private_file(path, json.dumps({"token": token, "password": password}))
    return password, token


def private_dir(path: Path) -> Path:
    """Make `path` (and its missing parents) a folder only its owner can enter (mode 700)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private_file(path: Path, text: str) -> None:
    """Write a secret atomically, mode 600 from its first byte, in a mode-700 folder."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the server's own bind: connections in TIME_WAIT don't make a port busy, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
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


def listening_pids(port: int) -> set[int] | None:
    """PIDs holding a listening TCP socket on `port` (Linux /proc); None where that can't be read."""
    inodes = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            if not os.path.exists(table):
                continue
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    except (OSError, ValueError):
        return None
    if not inodes:
        return set()
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def served_by_group(port: int, pgid: int) -> bool | None:
    """Whether a process of process group `pgid` (our server: started in a session of its own) listens on
    `port`; None where that can't be told (no /proc)."""
    pids = listening_pids(port)
    if pids is None:
        return None
    for pid in pids:
        try:
            if os.getpgid(pid) == pgid:
                return True
        except OSError:
            continue
    return False


def moved_port(logfile: Path, asked: int) -> int | None:
    """The port Label Studio moved to when `asked` was taken, read from the server's log ("* Port P is in use.
    * Trying to start at Q", then "Starting development server at http://127.0.0.1:Q/"); None if it did not."""
    try:
        text = logfile.read_text(errors="replace")
    except OSError:
        return None
    started = re.findall(r"Starting development server at https?://[^:/\s]+:(\d+)", text)
    trying = re.findall(rf"Port {asked} is in use\.\s*\*?\s*Trying to start at (\d+)", text)
    for found in (started, trying):
        if found and int(found[-1]) != asked:
            return int(found[-1])
    return None


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
    # healthy: it answers, and it is ours that listens there (not another server that took the port)
    healthy = alive and health_ok(info["url"]) and served_by_group(info["port"], info["pid"]) is not False
    return {"running": alive, "healthy": healthy, "pid": info["pid"], "url": info["url"], "port": info["port"],
            "asked_port": info.get("asked_port"), "log": info.get("log")}



def server_env(settings: ServerSettings, password: str, token: str,
               database: dict[str, str] | None = None) -> dict[str, str]:
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
        # Files are served only under this root and only below a project's Local Storage path.
        "LOCAL_FILES_DOCUMENT_ROOT": str(Path(settings.document_root or data_dir).resolve()),
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(database or {})  # PostgreSQL: DJANGO_DB=default and the POSTGRE_* settings
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
    if the port is taken by something else, or the server exits, or it makes no progress (log, CPU) for
    `wait_s` before answering (`_wait_healthy`: a slow first start on a busy machine is waited for).
    """
    data_dir = private_dir(Path(settings.data_dir).resolve())  # SQLite (admin token), media, credentials
    password, token = _credentials(settings)
    url = f"http://127.0.0.1:{settings.port}"
    with _file_lock(data_dir / ".server.lock"):
        st = server_status(data_dir)
        if st["running"]:
            if settings.port not in (st["port"], st.get("asked_port")):
                raise LabelStudioError(f"{data_dir}: a server for this data directory already runs on "
                                       f"port {st['port']} (pid {st['pid']}); stop it first")
            if not _wait_healthy(st["url"], st["pid"], wait_s) or served_by_group(st["port"], st["pid"]) is False:
                raise LabelStudioError(f"Label Studio (pid {st['pid']}) runs but {st['url']} does not answer as "
                                       f"ours; see {st.get('log')}")
            return ServerInfo(url=st["url"], token=token, pid=st["pid"], port=st["port"],
                              data_dir=str(data_dir), username=settings.username)
        if not port_is_free(settings.port):
            raise LabelStudioError(f"port {settings.port} on 127.0.0.1 is in use by another program (another "
                                   "sa-engine run?); set labelstudio.port to a free one (`sa-engine demo --port P`)")
        exe = ensure_installed(log=log)
        database = _database_env(settings, data_dir)
        if database is None:
            _seed_database(data_dir, log)
        logfile = data_dir / "server.log"
        cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
               "--port", str(settings.port), "--data-dir", str(data_dir)]
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(cmd, env=server_env(settings, password, token, database), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(data_dir), start_new_session=True)
        tmp = _pid_file(data_dir).with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "port": settings.port, "url": url,
                                   "log": str(logfile), "started_at": time.time()}))
        os.replace(tmp, _pid_file(data_dir))
        log(f"Label Studio starting on {url} (pid {proc.pid}, log {logfile})")
        port = settings.port
        if not _wait_healthy(url, proc.pid, wait_s, log, logfile):
            alive = _pid_alive(proc.pid)
            stop_server(data_dir)
            reason = (f"did not answer /health and made no progress for {wait_s:.0f} s" if alive
                      else "exited during start")
            raise LabelStudioError(f"Label Studio {reason}; see {logfile}")
        where = _where_ours_listens(settings.port, proc.pid, logfile, wait_s)
        if where is None:
            stop_server(data_dir)
            raise LabelStudioError(f"port {settings.port} on 127.0.0.1 was taken by another program while our "
                                   "Label Studio started; set labelstudio.port to a free port")
        if where != settings.port:
            # Another server took the port between our check and the start, and ours moved to the next one
            # (Label Studio does that silently; /health on the asked port answers for the other server).
            port, url = where, f"http://127.0.0.1:{where}"
            tmp.write_text(json.dumps({"pid": proc.pid, "port": port, "url": url, "log": str(logfile),
                                       "started_at": time.time(), "asked_port": settings.port}))
            os.replace(tmp, _pid_file(data_dir))
            log(f"Label Studio: port {settings.port} was taken during start; ours runs on {url}")
    return ServerInfo(url=url, token=token, pid=proc.pid, port=port, data_dir=str(data_dir),
                      username=settings.username)


def _where_ours_listens(asked: int, pid: int, logfile: Path, wait_s: float) -> int | None:
    """The port our server (process group `pid`) serves on: `asked`, or the one it moved to when another
    program held `asked` (its log says so); None if it is not up on either in `wait_s`. Where the listening
    process can't be read (no /proc), the asked port is taken as ours. Our token is sent to neither."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        ours = served_by_group(asked, pid)
        if ours is None or ours:
            return asked
        moved = moved_port(logfile, asked)
        if moved is not None and served_by_group(moved, pid) and health_ok(f"http://127.0.0.1:{moved}"):
            return moved
        if not _pid_alive(pid):
            return None
        time.sleep(0.5)
    return None


def _group_cpu_ticks(pgid: int) -> int | None:
    """CPU time (clock ticks) used so far by the processes of group `pgid`; None where /proc can't tell."""
    total, found = 0, False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
            found = True
    return total if found else None


def _wait_healthy(url: str, pid: int, stall_s: float, log: Callable[[str], None] | None = None,
                  logfile: Path | None = None, most_s: float = 1800.0, every_s: float = 30.0) -> bool:
    """Wait for `/health` while the server (process group `pid`) is alive and making progress: its log grows
    or it uses CPU. A first start runs database migrations that take minutes on a busy machine, so there is
    no fixed limit; it gives up after `stall_s` without progress, or `most_s` in all. A line every `every_s`."""
    start = last_progress = last_line = time.monotonic()

    def mark():
        size = logfile.stat().st_size if logfile is not None and logfile.exists() else None
        return size, _group_cpu_ticks(pid)

    seen = mark()
    while True:
        if health_ok(url):
            return True
        if not _pid_alive(pid):
            return False
        now = time.monotonic()
        current = mark()
        if current != seen:
            seen, last_progress = current, now
        if now - last_progress > stall_s or now - start > most_s:
            return False
        if log is not None and now - last_line >= every_s:
            log(f"Label Studio still starting ({now - start:.0f} s; a first start migrates its database"
                + (f"; log {logfile})" if logfile else ")"))
            last_line = now
        time.sleep(0.5)


def _database_env(settings: ServerSettings, data_dir: Path) -> dict[str, str] | None:
    """Label Studio's database settings: None for SQLite (its default, in data_dir)."""
    if settings.database == "sqlite":
        return None
    if settings.database != "postgresql":
        raise LabelStudioError(f"labelstudio.database: {settings.database!r} is not sqlite or postgresql")
    db = postgres.from_url(settings.database_url) if settings.database_url else postgres.start_local(data_dir)
    return db.env()


def stop_server(data_dir: Path, timeout_s: float = 20.0) -> bool:
    """Stop the managed server by its recorded PID (its process group: it was started in a session
    of its own). Returns True if one was running."""
    pf = _pid_file(Path(data_dir))
    if not pf.is_file():
        postgres.stop_local(Path(data_dir))
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
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child (else it lingers as a zombie)
    pf.unlink(missing_ok=True)
    postgres.stop_local(Path(data_dir))  # the managed cluster goes down with its server
    return was_running
