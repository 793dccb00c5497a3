"""The ML backend over HTTP: a small WSGI app served by waitress.

Why waitress: a request reaches one of a fixed number of worker threads only once it has fully arrived (headers
and body, chunked or not), so a connection that sends nothing, or a body a byte at a time, holds a socket and no
thread; connections are capped (`connection_limit`) and idle ones closed (`channel_timeout`); oversized bodies
get 413 before they are read. The app itself only routes, checks the token and maps errors to statuses.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import simdjson
from waitress import wasyncore
from waitress.server import create_server

from engine.integrations.ml_backend.predict import (BackendState, RequestError, authorized, predict_payload,
                                                    prefetch_payload)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # Label Studio inlines a task's annotations and predictions: generous, bounded


@dataclass(frozen=True)
class ServerLimits:
    """What one backend process holds at most. Idle connections cost a socket, not a thread."""

    threads: int = 8  # requests answered at once (a click is one decoder pass; embeddings are shared)
    connection_limit: int = 512  # open connections; beyond it new ones wait in the listen backlog
    channel_timeout_s: int = 30  # a connection idle this long with no request in progress is closed
    max_body_bytes: int = MAX_BODY_BYTES


def _json(start_response, status: int, body: dict, extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    data = json.dumps(body).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
              413: "Payload Too Large", 422: "Unprocessable Entity", 500: "Internal Server Error"}[status]
    start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(data))), *extra])
    return [data]


def make_app(state: BackendState) -> Callable:
    """The WSGI app: GET /health; POST /setup, /predict, /prefetch, /webhook, /health. Every call needs the
    token."""

    def app(environ, start_response):
        if not authorized(environ.get("HTTP_AUTHORIZATION"), state.token):
            return _json(start_response, 401, {"error": "unauthorized"},
                         [("WWW-Authenticate", 'Basic realm="sa-engine ml backend"')])
        path = environ.get("PATH_INFO", "").rstrip("/")
        method = environ["REQUEST_METHOD"]
        if method == "GET":
            if path in ("/health", ""):
                predictor = state.predictor
                return _json(start_response, 200, {
                    "status": "UP", "model_class": "sa-engine", "model_version": predictor.model_version,
                    "predictions": state.predictions, "prefetch_pending": predictor.cache.pending_prefetch()})
            return _json(start_response, 404, {"error": f"no such endpoint {path}"})
        if method != "POST":
            return _json(start_response, 405, {"error": f"{method} is not served"}, [("Allow", "GET, POST")])
        try:
            body = _body(environ)
            if path == "/setup":
                state.ls_hostname = body.get("hostname") or state.ls_hostname
                state.ls_access_token = body.get("access_token") or state.ls_access_token
                return _json(start_response, 200, {"model_version": state.predictor.model_version})
            if path == "/predict":
                t = time.perf_counter()
                out = predict_payload(state, body)
                state.timings_ms.append((time.perf_counter() - t) * 1e3)
                del state.timings_ms[:-1000]
                return _json(start_response, 200, out)
            if path == "/prefetch":
                return _json(start_response, 200, prefetch_payload(state, body))
            if path == "/webhook":
                state.webhooks += 1
                return _json(start_response, 200, {"status": "ok"})
            if path == "/health":
                return _json(start_response, 200, {"status": "UP"})
            return _json(start_response, 404, {"error": f"no such endpoint {path}"})
        except RequestError as e:
            state.last_error = f"{path}: {e}"
            log.warning("ML backend %s", state.last_error)
            return _json(start_response, e.status, {"error": state.last_error})
        except Exception as e:  # a failed prediction must not take the server down
            state.last_error = f"{path}: {type(e).__name__}: {e}"
            log.exception("ML backend %s", path)
            return _json(start_response, 500, {"error": state.last_error})

    return app


# What a request's tasks carry that the backend never reads: Label Studio sends every earlier region of the task
# (annotations, predictions, drafts) with each click; left unparsed, a click costs the same with 300 regions.
_UNREAD_TASK_KEYS = ("annotations", "predictions", "drafts")


def _body(environ) -> dict:
    """The request's JSON object (waitress has read it whole, de-chunked, within the size limit). Parsed lazily
    with simdjson: only `params` and each task's other keys are turned into Python objects."""
    raw = environ["wsgi.input"].read()
    if not raw:
        return {}
    try:
        doc = _PARSER.get().parse(raw)
    except ValueError as e:  # simdjson's errors for malformed JSON and bad UTF-8
        raise RequestError(400, f"body is not JSON ({e})") from None
    if not isinstance(doc, simdjson.Object):
        raise RequestError(400, f"body must be a JSON object, got {_kind(doc)}")
    # keys() and [] only: items() would turn every value, the unread ones too, into Python objects
    body = {k: _plain(doc[k]) for k in doc.keys() if k != "tasks"}
    if "tasks" in doc:
        tasks = doc["tasks"]
        if not isinstance(tasks, simdjson.Array):
            body["tasks"] = _plain(tasks)  # not a list: predict_payload names the problem
        else:
            body["tasks"] = [{k: _plain(t[k]) for k in t.keys() if k not in _UNREAD_TASK_KEYS}
                             if isinstance(t, simdjson.Object) else _plain(t) for t in tasks]
    return body


def _plain(v):
    return v.as_dict() if isinstance(v, simdjson.Object) else v.as_list() if isinstance(v, simdjson.Array) else v


def _kind(v) -> str:
    return "list" if isinstance(v, simdjson.Array) else type(v).__name__


class _Parsers(threading.local):
    """One simdjson parser per worker thread (a parser is reused across documents, not shared)."""

    def get(self) -> "simdjson.Parser":
        if not hasattr(self, "parser"):
            self.parser = simdjson.Parser()
        return self.parser


_PARSER = _Parsers()


def is_loopback(host: str) -> bool:
    """A literal loopback address or `localhost` ("" and 0.0.0.0 mean every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class MLBackend:
    """The HTTP server on 127.0.0.1 (by default; `::1` and other addresses as given), in a background thread
    or in the foreground."""

    def __init__(self, state: BackendState, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False,
                 limits: ServerLimits | None = None):
        if not allow_remote and not is_loopback(host):
            raise ValueError(f"ml backend: refusing to listen on {host!r} (not a loopback address); "
                             "--allow-remote serves other machines (the token still guards every request)")
        self.state, self.limits = state, limits or ServerLimits()
        bare = host.strip("[]")
        listen = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
        try:
            self.server = create_server(
                make_app(state), listen=listen, threads=self.limits.threads,
                connection_limit=self.limits.connection_limit, channel_timeout=self.limits.channel_timeout_s,
                cleanup_interval=max(1, min(30, self.limits.channel_timeout_s // 2)),
                max_request_body_size=self.limits.max_body_bytes, asyncore_use_poll=True,
                # A click's body (with every earlier region) read in few calls and kept in memory
                recv_bytes=1 << 20, inbuf_overflow=self.limits.max_body_bytes,
                ident="sa-engine", expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        except OSError as e:
            raise ValueError(f"ml backend: cannot listen on {listen} ({e.strerror or e})") from None
        self.host, self.port = bare, self.server.effective_port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    def open_connections(self) -> int:
        """Client connections held now (the listener and waitress's wake-up pipe not counted)."""
        return len(self.server.active_channels)

    def start(self) -> "MLBackend":
        if self._thread is not None:  # already serving (start() then `with`): a second loop would outlive stop()
            return self
        self._thread = threading.Thread(target=self.server.run, name="sa-engine-ml-backend", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.run()

    def stop(self) -> None:
        self.server.task_dispatcher.shutdown(timeout=5)
        wasyncore.close_all(self.server._map)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "MLBackend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
