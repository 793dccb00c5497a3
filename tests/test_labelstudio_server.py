"""The managed Label Studio server: install (cached), start headless on loopback, token, stop by PID."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from engine.integrations.labelstudio import (
    LabelStudio,
    LabelStudioError,
    ServerSettings,
    health_ok,
    labeling_config,
    server_status,
    start_server,
    stop_server,
)
from tests.output import last_json

pytestmark = pytest.mark.labelstudio


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (from /proc/net/tcp{,6})."""
    out = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                out.add(addr)
    return out


def test_server_is_up_on_loopback_only_with_token(labelstudio_server):
    info = labelstudio_server
    assert health_ok(info.url)
    st = server_status(info.data_dir)
    assert st["running"] and st["healthy"] and st["pid"] == info.pid
    assert _listening_addresses(info.port) == {"0100007F"}  # 127.0.0.1, nothing on 0.0.0.0 or ::
    assert info.client.sdk.users.whoami().email == "admin@sa-engine.local"
    with pytest.raises(LabelStudioError, match="401"):
        LabelStudio(info.url, "0" * 40, retries=0).ensure_project("refused")


def test_up_twice_is_harmless_and_down_then_up_restarts(labelstudio_server):
    info = labelstudio_server
    settings = ServerSettings(data_dir=info.data_dir, port=info.port, document_root=info.document_root)
    again = start_server(settings, log=lambda m: None)
    assert again.pid == info.pid and again.url == info.url
    assert stop_server(info.data_dir)
    assert not server_status(info.data_dir)["running"] and not health_ok(info.url)
    assert not stop_server(info.data_dir)  # nothing left to stop
    restarted = start_server(settings, log=lambda m: None)  # warm restart: same data, same token
    info.pid = restarted.pid
    assert health_ok(info.url) and restarted.token == info.token
    assert info.client.find_project("refused") is None


def test_a_new_data_directory_starts_from_the_migrated_empty_database(labelstudio_server):
    """The fixture's server started from the install's migrated empty database (no user in it: the admin and
    its token above were made by the server's own first start)."""
    import sqlite3

    from engine.integrations.labelstudio.server import database_template

    template = database_template(log=lambda m: None)
    assert template is not None and (Path(labelstudio_server.data_dir) / template.name).is_file()
    first_applied = "select applied from django_migrations order by id limit 1"
    with sqlite3.connect(f"file:{template}?mode=ro", uri=True) as db:
        assert db.execute("select count(*) from htx_user").fetchone()[0] == 0
        assert db.execute("select count(*) from django_migrations").fetchone()[0] > 100
        made = db.execute(first_applied).fetchone()[0]
    with sqlite3.connect(f"file:{Path(labelstudio_server.data_dir) / template.name}?mode=ro", uri=True) as db:
        assert db.execute(first_applied).fetchone()[0] == made  # copied, not migrated again


def test_an_install_that_cannot_migrate_leaves_each_start_to_migrate_itself(tmp_path):
    from engine.integrations.labelstudio.server import _MARKER, _seed_database, database_template

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "label-studio").write_text("#!/bin/sh\nexit 3\n")
    (venv / "bin" / "label-studio").chmod(0o755)
    (venv / _MARKER).write_text("x")
    said: list[str] = []
    assert database_template(venv, log=said.append) is None
    assert "could not prepare an empty database (exit 3" in said[-1]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "label_studio.sqlite3").write_text("kept")
    _seed_database(data_dir, log=said.append)  # an existing database is never replaced
    assert (data_dir / "label_studio.sqlite3").read_text() == "kept"


def test_port_taken_by_someone_else_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LabelStudioError, match=f"port {port} .* in use"):
            start_server(ServerSettings(data_dir=tmp_path / "ls", port=port), log=lambda m: None)


def test_token_must_be_legacy_hex_and_match_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SA_ENGINE_LS_TOKEN", raising=False)
    with pytest.raises(LabelStudioError, match="40 hex"):
        start_server(ServerSettings(data_dir=tmp_path / "a", port=1, token="short"), log=lambda m: None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "credentials.json").write_text(json.dumps({"token": "a" * 40, "password": "x"}))
    with pytest.raises(LabelStudioError, match="differs"):
        start_server(ServerSettings(data_dir=tmp_path / "b", port=1, token="b" * 40), log=lambda m: None)


def test_labeling_config_is_accepted_by_the_server(labelstudio_server):
    ls = labelstudio_server.client
    pid = ls.ensure_project("config check")
    assert ls.ensure_project("config check") == pid  # idempotent by title
    project = ls.sdk.projects.get(id=pid)
    assert "BrushLabels" in project.label_config and project.label_config.strip() == labeling_config().strip()
    ls.delete_project(pid)


def test_a_port_taken_during_start_is_noticed_and_our_token_goes_nowhere_else(tmp_path, monkeypatch):
    """Another server takes the port between the free-port check and the start (the check is made to pass):
    Label Studio silently moves to the next port; the engine finds ours by the process listening there, records
    it, and never calls the other server with our token; `labelstudio status` reports ours, not the other one."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import engine.integrations.labelstudio.server as lsmod

    seen = []

    class Other(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    for _ in range(50):  # a port whose next one is free too (where ours will move)
        other = ThreadingHTTPServer(("127.0.0.1", 0), Other)
        port = other.server_address[1]
        if lsmod.port_is_free(port + 1):
            break
        other.server_close()
    threading.Thread(target=other.serve_forever, daemon=True).start()
    monkeypatch.setattr(lsmod, "port_is_free", lambda p, host="127.0.0.1": True)  # the race window
    data_dir = tmp_path / "ls"
    try:
        info = start_server(ServerSettings(data_dir=data_dir, port=port, document_root=tmp_path), wait_s=300,
                            log=lambda m: None)
        try:
            assert info.port == port + 1 and info.url.endswith(f":{port + 1}")
            assert LabelStudio(info.url, info.token).sdk.users.whoami().email == "admin@sa-engine.local"
            status = server_status(data_dir)
            assert status["healthy"] and status["url"] == info.url
            assert all(auth is None for _, auth in seen)  # nothing carrying our token reached the other server
        finally:
            stop_server(data_dir)
    finally:
        other.shutdown()
        other.server_close()


def test_status_shows_the_password_only_when_asked(tmp_path):
    """`sa-engine labelstudio status` names the user and where the password is kept (the 0600 credentials file
    written at the first start), never the password itself unless --show-password; exits 1 while no server is
    up."""
    import yaml
    from typer.testing import CliRunner

    from engine.cli import app

    (tmp_path / "labelstudio").mkdir()
    (tmp_path / "labelstudio" / "credentials.json").write_text(json.dumps({"token": "a" * 40, "password": "pw-1"}))
    (tmp_path / "engine.yaml").write_text(yaml.safe_dump({"workdir": str(tmp_path)}))
    status = ["labelstudio", "status", "--config", str(tmp_path / "engine.yaml")]
    res = CliRunner().invoke(app, status)
    assert res.exit_code == 1
    assert "pw-1" not in res.output
    st = last_json(res.stdout)
    assert st["username"] == "admin@sa-engine.local" and "password" not in st and not st["healthy"]
    assert st["credentials_file"].endswith("credentials.json")
    res = CliRunner().invoke(app, status + ["--show-password"])
    st = last_json(res.stdout)
    assert st["password"] == "pw-1"


_SLOW_SERVER = """
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
log, port, busy = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.time() + busy
while time.time() < end:  # 'migrations': a line a second, for longer than the waiter's stall limit
    with open(log, "a") as f:
        f.write("migrating\\n")
    time.sleep(1.0)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_a_slow_first_start_is_waited_for_while_it_makes_progress(tmp_path):
    """Issue 31.15: a server that takes longer than the stall limit but keeps writing its log is waited for
    (with a progress line), one that hangs without progress is given up on after the stall limit."""
    import subprocess
    import sys
    import time

    from engine.integrations.labelstudio import _wait_healthy, free_port

    port, logfile = free_port(), tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SERVER, str(logfile), str(port), "6"],
                            start_new_session=True)
    lines: list[str] = []
    try:
        start = time.monotonic()
        assert _wait_healthy(f"http://127.0.0.1:{port}", proc.pid, 3.0, lines.append, logfile, every_s=2.0)
        assert time.monotonic() - start > 5.0 and any("still starting" in line for line in lines)
    finally:
        proc.kill()
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        start = time.monotonic()
        assert not _wait_healthy(f"http://127.0.0.1:{free_port()}", hung.pid, 2.0, None, tmp_path / "none.log")
        assert time.monotonic() - start < 10.0
    finally:
        hung.kill()
