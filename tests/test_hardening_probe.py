"""The second hardening pass replayed (issue 31), on loopback only: the redirect cases (no token to any listener
but the configured Label Studio), a damaged manifest followed by `gc` (no committed mask lost), 40 single-byte
flips read through the normal read path (no altered row returned), and a 110-megapixel photo (finished or set
aside with a reason, peak memory printed)."""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine.integrations.ml_backend import BackendState, EmbeddingCache, MaskPredictor, MLBackend, source_image_loader
from engine.integrations.labelstudio import keypoint_context
from model.segmenter import Segmenter
from tests.test_ml_backend import TOKEN, H, W, _call, _png_bytes, images  # noqa: F401  (images: a fixture)


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Listener:
    """An HTTP server on `host` that records (path, Authorization) of every request; `routes` maps a path to a
    redirect target (a function of the listeners, called per request), anything else answers a PNG."""

    def __init__(self, host: str = "127.0.0.1", routes: dict | None = None, port: int = 0):
        self.requests: list[tuple[str, str | None]] = []
        seen, png, self.routes = self.requests, _png_bytes(), routes if routes is not None else {}
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                seen.append((self.path, self.headers.get("Authorization")))
                target = listener.routes.get(self.path)
                if target is not None:
                    self.send_response(302)
                    self.send_header("Location", target())
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        cls = _V6Server if ":" in host else ThreadingHTTPServer
        self.httpd = cls((host, port), Handler)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.httpd.server_address[1]}"
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_label_studio_token_never_follows_a_redirect_off_its_origin(images):  # noqa: F811
    """Issue 31.1: an image URL on the configured Label Studio that redirects to another port, [::1],
    localhost, 127.0.0.2 or through a two-hop chain delivers the token to none of them (the request is refused
    with one line); a redirect that stays on Label Studio still works, token and all."""
    trusted = _Listener()
    others = {"port": _Listener(), "v6": _Listener("::1", port=trusted.port),
              "localhost": _Listener("127.0.0.1"), "127.0.0.2": _Listener("127.0.0.2", port=trusted.port)}
    trusted.routes.update({
        "/r/port": lambda: f"{others['port'].url}/x.png",
        "/r/v6": lambda: f"http://[::1]:{trusted.port}/x.png",
        "/r/localhost": lambda: f"http://localhost:{others['localhost'].port}/x.png",
        "/r/127.0.0.2": lambda: f"http://127.0.0.2:{trusted.port}/x.png",
        "/r/chain": lambda: "/r/chain2",  # on the origin, then off it
        "/r/chain2": lambda: f"{others['port'].url}/y.png",
        "/r/same": lambda: "/data/upload/1/x.png",  # Label Studio's own storage redirect, kept on the origin
    })
    seg = Segmenter.new("compact")
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), TOKEN, None)
    state.image_loader = source_image_loader(images, trusted_ls_url=trusted.url, state=state)
    ctx = keypoint_context([(40, 25)], [1], H, W)
    auth = f"Token {TOKEN}"

    def predict(path):
        task = {"id": 9, "data": {"image": trusted.url + path, "height": H, "width": W}}
        return _call(backend.url, "/predict", {"tasks": [task], "params": {"context": ctx}}, auth)

    try:
        with MLBackend(state) as backend:
            assert _call(backend.url, "/setup", {"hostname": trusted.url, "access_token": "ls-secret"}, auth)[0] == 200
            delivered = 0
            for case in ("/r/port", "/r/v6", "/r/localhost", "/r/127.0.0.2", "/r/chain"):
                code, _ = predict(case)
                assert code == 400 and "redirected to" in backend.state.last_error, (case, backend.state.last_error)
                delivered += sum(auth_header is not None for o in others.values() for _, auth_header in o.requests)
            print(f"redirect cases: 5, tokens delivered off the origin: {delivered}")
            assert delivered == 0 and all(o.requests == [] for o in others.values())
            trusted.requests.clear()
            code, body = predict("/r/same")
            assert code == 200 and body["results"]
            assert trusted.requests == [("/r/same", "Token ls-secret"), ("/data/upload/1/x.png", "Token ls-secret")]
    finally:
        for listener in [trusted, *others.values()]:
            listener.close()
