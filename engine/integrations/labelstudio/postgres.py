"""Label Studio's database when a team annotates: a local PostgreSQL cluster the engine manages, or one by URL.

SQLite serialises every write, which is fine for one person; Label Studio's own docs recommend PostgreSQL for
teams. Managed: Debian's PostgreSQL binaries (`initdb`, `pg_ctl`; `./dev.sh setup` installs the package where it
may) run one cluster per Label Studio data directory, on 127.0.0.1 and a port of its own, with a generated
password kept beside Label Studio's credentials. PostgreSQL refuses to run as root, so under root the cluster
runs as the `postgres` system user, in a folder of its own under /var/tmp (Label Studio's data directory is
private to root).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from engine.integrations.labelstudio.errors import LabelStudioError

DB_NAME = "labelstudio"
DB_USER = "sa_engine"


@dataclass(frozen=True)
class Database:
    """Where Label Studio's PostgreSQL database is (the environment Label Studio reads it from)."""

    host: str
    port: int
    name: str
    user: str
    password: str

    def env(self) -> dict[str, str]:
        return {"DJANGO_DB": "default", "POSTGRE_HOST": self.host, "POSTGRE_PORT": str(self.port),
                "POSTGRE_NAME": self.name, "POSTGRE_USER": self.user, "POSTGRE_PASSWORD": self.password}


def from_url(url: str) -> Database:
    """`postgresql://user:password@host:port/name` (the password may also come from SA_ENGINE_LS_DB_PASSWORD)."""
    u = urlparse(url)
    if u.scheme not in ("postgres", "postgresql") or not u.hostname or not u.path.strip("/"):
        raise LabelStudioError(f"labelstudio.database_url: {_redacted(url)!r} is not "
                               "postgresql://user:password@host:port/database")
    password = unquote(u.password or "") or os.environ.get("SA_ENGINE_LS_DB_PASSWORD", "")
    return Database(u.hostname, u.port or 5432, u.path.strip("/"), unquote(u.username or "postgres"), password)


def _redacted(url: str) -> str:
    u = urlparse(url)
    return url.replace(f":{u.password}@", ":***@") if u.password else url


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (PATH first, then Debian's /usr/lib/postgresql/<v>/bin)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3])
                      if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


def cluster_dir(ls_data_dir: Path) -> Path:
    """Where the cluster of this Label Studio data directory lives."""
    if os.geteuid() != 0:
        return Path(ls_data_dir) / "postgres"
    key = hashlib.sha1(str(Path(ls_data_dir).resolve()).encode()).hexdigest()[:16]
    return Path("/var/tmp/sa-engine-postgres") / key


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, log: Path) -> None:
    with open(log, "ab") as out:
        rc = subprocess.call(_as_owner(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise LabelStudioError(f"PostgreSQL: {what} failed (exit {rc}); see {log}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(ls_data_dir: Path) -> Database:
    """Start (creating it on first use) the managed cluster of this Label Studio data directory; idempotent.
    Raises LabelStudioError with one line when PostgreSQL is not installed or does not start."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise LabelStudioError("labelstudio.database: postgresql needs PostgreSQL's server programs (Debian: "
                               "apt-get install postgresql; ./dev.sh setup does it as root) or "
                               "labelstudio.database_url")
    ls_data_dir = Path(ls_data_dir)
    secrets_file = ls_data_dir / "postgres.json"
    folder = cluster_dir(ls_data_dir)
    data, log = folder / "data", ls_data_dir / "postgres.log"
    if secrets_file.is_file():
        saved = json.loads(secrets_file.read_text())
    else:
        saved = {"password": secrets.token_hex(16), "port": _free_port()}
        tmp = secrets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        os.chmod(tmp, 0o600)
        os.replace(tmp, secrets_file)
    db = Database("127.0.0.1", int(saved["port"]), DB_NAME, DB_USER, saved["password"])
    if not (data / "PG_VERSION").is_file():
        shutil.rmtree(data, ignore_errors=True)  # a half-made cluster from an interrupted first start
        folder.parent.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(folder.parent, 0o755)  # the postgres user must reach its folder
        folder.mkdir(exist_ok=True, mode=0o700)
        data.mkdir(mode=0o700)
        pwfile = folder / ".pw"
        pwfile.write_text(db.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(pwfile, 0o600)
        try:
            _run([str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"], "initdb", log)
        finally:
            pwfile.unlink(missing_ok=True)
    if not _running(bin_dir, data):
        # TCP on loopback only, no Unix socket (its path may be too long, its default folder root's)
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "120",
              "-o", f"-c listen_addresses=127.0.0.1 -p {db.port} -c unix_socket_directories=''", "start"],
             "start", log)
    _ensure_database(bin_dir, db, log)
    return db


def _running(bin_dir: Path, data: Path) -> bool:
    with open(os.devnull, "wb") as null:
        return subprocess.call(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "status"]),
                               stdout=null, stderr=null) == 0


def _ensure_database(bin_dir: Path, db: Database, log: Path) -> None:
    env = {**os.environ, "PGPASSWORD": db.password}
    psql = shutil.which("psql") or str(bin_dir / "psql")
    query = [psql, "-h", db.host, "-p", str(db.port), "-U", db.user, "-d", "postgres", "-tAc"]
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run([*query, f"SELECT 1 FROM pg_database WHERE datname = '{db.name}'"], env=env,
                             capture_output=True, text=True)
        if out.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise LabelStudioError(f"PostgreSQL on {db.host}:{db.port} does not answer: {out.stderr.strip()[:200]}")
        time.sleep(0.5)
    if out.stdout.strip() != "1":
        made = subprocess.run([*query, f"CREATE DATABASE {db.name}"], env=env, capture_output=True, text=True)
        if made.returncode != 0:
            raise LabelStudioError(f"PostgreSQL: creating database {db.name} failed: {made.stderr.strip()[:200]}")


def stop_local(ls_data_dir: Path) -> bool:
    """Stop the managed cluster of this data directory, if it runs. True if it was running."""
    bin_dir = pg_bin()
    data = cluster_dir(Path(ls_data_dir)) / "data"
    if bin_dir is None or not (data / "PG_VERSION").is_file() or not _running(bin_dir, data):
        return False
    with open(os.devnull, "wb") as null, contextlib.suppress(OSError):
        subprocess.call(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                        stdout=null, stderr=null)
    return True
