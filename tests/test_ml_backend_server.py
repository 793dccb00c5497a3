"""The ML backend's HTTP server under what a team and the open network send it (issue 36.1): a flood of
half-open connections and withheld bodies, malformed bodies, a non-ASCII token, a chunked body, a slow image
server, IPv6 loopback. Each case answers with the right status and the server keeps answering /health."""
from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from engine.integrations import ml_backend
from engine.integrations.labelstudio import keypoint_context
from engine.integrations.ml_backend import (BackendState, EmbeddingCache, MaskPredictor, MLBackend, ServerLimits,
                                            source_image_loader)
from model.segmenter import Segmenter
from tests.test_ml_backend import TOKEN, H, W, _png_bytes, images  # noqa: F401  (images: a fixture)

AUTH = {"Authorization": f"Token {TOKEN}"}


def _state(images) -> BackendState:  # noqa: F811
    seg = Segmenter.new("compact")
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), TOKEN, None)
    state.image_loader = source_image_loader(images, state=state)
    return state


def _request(backend: MLBackend, method: str, path: str, body=None, headers: dict | None = None,
             timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(backend.host, backend.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={**AUTH, **(headers or {})},
                     encode_chunked=(headers or {}).get("Transfer-Encoding") == "chunked")
        r = conn.getresponse()
        raw = r.read()
        json_body = raw and r.getheader("Content-Type", "").startswith("application/json")
        return r.status, json.loads(raw) if json_body else {"error": raw.decode("latin-1")}
    finally:
        conn.close()


def _predict_body(image_id: str = "im0.png", context=None) -> dict:
    return {"tasks": [{"id": 1, "data": {"image_id": image_id, "height": H, "width": W}}],
            "params": {"context": context if context is not None else keypoint_context([(40, 25)], [1], H, W)}}


@pytest.fixture(scope="module")
def server(images):  # noqa: F811
    with MLBackend(_state(images), limits=ServerLimits(threads=4, connection_limit=600, channel_timeout_s=3)) as b:
        yield b


def test_a_flood_of_half_open_connections_holds_no_thread_and_health_answers_throughout(server):
    """300 connections that send nothing and 50 authenticated requests whose body never comes: the server holds
    at most its connection limit, no thread per connection, /health answers within a second all along, and the
    idle connections are closed after `channel_timeout_s`."""
    threads_before = threading.active_count()
    flood = []
    for _ in range(300):
        flood.append(socket.create_connection((server.host, server.port)))
    for _ in range(50):
        s = socket.create_connection((server.host, server.port))
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Token {TOKEN}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"tas".encode())
        flood.append(s)
    try:
        worst = 0.0
        for _ in range(5):
            t = time.perf_counter()
            assert _request(server, "GET", "/health", timeout=5)[0] == 200
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.2)
        assert worst < 1.0, worst
        assert 300 <= server.open_connections() <= server.limits.connection_limit
        assert threading.active_count() <= threads_before + 1  # the flood started no thread
        deadline = time.monotonic() + 15
        while server.open_connections() > 10 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server.open_connections() <= 10, "idle connections were not closed"
        assert _request(server, "POST", "/predict", _predict_body())[0] == 200
    finally:
        for s in flood:
            s.close()


def test_the_connection_limit_is_a_ceiling(images):  # noqa: F811
    with MLBackend(_state(images), limits=ServerLimits(threads=2, connection_limit=20, channel_timeout_s=30)) as b:
        flood = [socket.create_connection((b.host, b.port)) for _ in range(60)]
        try:
            time.sleep(0.5)
            assert b.open_connections() <= 20
        finally:
            for s in flood:
                s.close()


@pytest.mark.parametrize("context, why", [
    ({"result": {"type": "keypointlabels"}}, "must be a list of objects"),
    ({"result": ["a", "b"]}, "must be a list of objects"),
    ({"result": [{"type": "keypointlabels", "value": {"x": "left", "y": 3}}]}, "value.x must be a number"),
    ({"result": [{"type": "keypointlabels", "value": ["x"]}]}, "value must be an object"),
    ("context", "params.context must be an object"),
])
def test_malformed_contexts_answer_400_with_the_reason(server, context, why):
    code, body = _request(server, "POST", "/predict", _predict_body(context=context))
    assert code == 400 and why in body["error"], body


def test_requests_that_cannot_be_answered_get_4xx_not_500(server, images, tmp_path):  # noqa: F811
    assert _request(server, "POST", "/predict", _predict_body("no-such.png"))[0] == 404
    assert _request(server, "POST", "/predict", _predict_body("../../etc/passwd"))[0] in (400, 404)
    task = _predict_body()
    task["tasks"][0]["data"]["height"] = "tall"
    assert _request(server, "POST", "/predict", task)[0] == 400
    assert _request(server, "POST", "/predict", b"{not json")[0] == 400
    assert _request(server, "POST", "/predict", b"[1, 2]")[0] == 400
    assert _request(server, "DELETE", "/predict")[0] == 405
    # A decompression bomb: a small PNG that claims 200 megapixels
    bomb = Image.new("1", (20000, 10000))
    buf = io.BytesIO()
    bomb.save(buf, format="PNG")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bomb.png").write_bytes(buf.getvalue())
    from storage.images import ImageSource

    state = _state(ImageSource(str(tmp_path / "images")))
    with MLBackend(state) as b:
        code, body = _request(b, "POST", "/predict", _predict_body("bomb.png"))
        assert code == 422 and "pixels" in body["error"], body
    big = MLBackend(_state(images), limits=ServerLimits(max_body_bytes=1000)).start()
    try:
        assert _request(big, "POST", "/predict", b"{" + b" " * 5000 + b"}")[0] == 413
    finally:
        big.stop()
    assert _request(server, "GET", "/health")[0] == 200


def test_a_non_ascii_token_is_refused_with_401(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.putrequest("GET", "/health")
    conn.putheader("Authorization", "Token s\u00e9cret\u2603".encode("utf-8"))
    conn.endheaders()
    assert conn.getresponse().status == 401
    conn.close()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.putrequest("GET", "/health")
    conn.putheader("Authorization", b"Basic \xff\xfe")
    conn.endheaders()
    assert conn.getresponse().status == 401


def test_a_chunked_body_is_read_and_answered(server):
    raw = json.dumps(_predict_body()).encode()
    chunks = [raw[i:i + 37] for i in range(0, len(raw), 37)]
    code, body = _request(server, "POST", "/predict", iter(chunks), {"Transfer-Encoding": "chunked",
                                                                    "Content-Type": "application/json"})
    assert code == 200 and body["results"] and body["results"][0]["result"], body
    plain = _request(server, "POST", "/predict", _predict_body())[1]
    assert body["results"][0]["result"][0]["value"]["rle"] == plain["results"][0]["result"][0]["value"]["rle"]


def test_a_slow_image_server_is_given_up_at_the_fetch_deadline(images, monkeypatch):  # noqa: F811
    """An image server that sends a byte every 0.3 s never trips a socket timeout; the fetch's own deadline
    ends it with 422 and the server answers the next request."""
    png = _png_bytes()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(png)}\r\n\r\n".encode())
        for b in png:
            if stop.wait(0.3):
                break
            try:
                conn.sendall(bytes([b]))
            except OSError:
                break
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    monkeypatch.setattr(ml_backend.predict, "FETCH_DEADLINE_S", 2.0)
    ls_url = f"http://127.0.0.1:{port}"
    state = _state(None)
    state.image_loader = source_image_loader(None, trusted_ls_url=ls_url, state=state)
    try:
        with MLBackend(state) as b:
            t = time.perf_counter()
            task = {"tasks": [{"id": 3, "data": {"image": f"{ls_url}/data/x.png", "height": H, "width": W}}],
                    "params": {"context": keypoint_context([(40, 25)], [1], H, W)}}
            code, body = _request(b, "POST", "/predict", task)
            assert code == 422 and "to fetch" in body["error"], body
            assert time.perf_counter() - t < 10
            assert _request(b, "GET", "/health")[0] == 200
    finally:
        stop.set()
        listener.close()


def test_ipv6_loopback_serves_and_other_addresses_are_refused_in_one_line(images):  # noqa: F811
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    with MLBackend(_state(images), host="::1") as b:
        assert b.url.startswith("http://[::1]:")
        assert _request(b, "GET", "/health")[0] == 200
        assert _request(b, "POST", "/predict", _predict_body())[0] == 200
    with pytest.raises(ValueError, match="not a loopback address"):
        MLBackend(_state(images), host="0.0.0.0")
    with pytest.raises(ValueError, match="cannot listen on"):
        MLBackend(_state(images), host="127.0.0.1", port=_taken_port())


def _taken_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _taken_port.keep = s  # held open for the test's lifetime
    return s.getsockname()[1]


def test_answers_are_the_models_answers_through_the_new_server(server, images):  # noqa: F811
    """The server changed, the answer did not: the brush mask is MaskPredictor's own mask for that click."""
    from engine.integrations.ml_backend import prompt_from_context
    from storage.brush_rle import decode_mask

    code, body = _request(server, "POST", "/predict", _predict_body())
    mask = decode_mask(body["results"][0]["result"][0]["value"]["rle"], H, W)
    prompt = prompt_from_context(_predict_body()["params"]["context"], H, W)
    direct, _ = server.state.predictor.predict("im0.png", lambda: images.load(images.ref("im0.png")).pixels, prompt)
    assert code == 200 and np.array_equal(mask, direct)


def _until(check, wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_prefetch_makes_the_first_click_a_cache_hit_within_the_budget(images):  # noqa: F811
    """POST /prefetch embeds the tasks' images ahead in the order given, at most the cache's size of them; the
    first click on a prefetched image is then a hit (no embedding on the click), on another a miss."""
    state = _state(images)
    cache = state.predictor.cache
    cache.max_items = 1  # the budget: one image ahead
    with MLBackend(state) as b:
        tasks = [{"id": k, "data": {"image_id": f"im{k}.png", "height": H, "width": W}} for k in (1, 0)]
        code, body = _request(b, "POST", "/prefetch", {"tasks": tasks})
        assert code == 200 and body["queued"] == 1  # im1 first (the order given), im0 over the budget
        _until(lambda: _request(b, "GET", "/health")[1]["prefetch_pending"] == 0)
        assert "im1.png" in cache and "im0.png" not in cache and (cache.hits, cache.misses) == (0, 0)
        body = _predict_body("im1.png")
        assert _request(b, "POST", "/predict", body)[0] == 200
        assert (cache.hits, cache.misses) == (1, 0)
        assert _request(b, "POST", "/predict", _predict_body("im0.png"))[0] == 200
        assert cache.misses == 1
        assert _request(b, "POST", "/prefetch", {"tasks": "x"})[0] == 400


def test_a_promoted_model_embeds_the_images_in_use_before_their_next_click(images):  # noqa: F811
    from engine.integrations.ml_backend import ModelFollower

    state = _state(images)
    with MLBackend(state) as b:
        for image_id in ("im0.png", "im1.png"):
            assert _request(b, "POST", "/predict", _predict_body(image_id))[0] == 200
        promoted = Segmenter.new("compact", seed=7)
        in_use = ["r0"]
        follower = ModelFollower(state, lambda: in_use[0], lambda ck: promoted)
        in_use[0] = "r1"  # a round promoted a new model
        assert follower.check()
        cache = state.predictor.cache
        assert cache.segmenter is promoted
        _until(lambda: cache.pending_prefetch() == 0)
        assert "im0.png" in cache and "im1.png" in cache and cache.misses == 0
        code, answer = _request(b, "POST", "/predict", _predict_body("im1.png"))
        assert code == 200 and answer["results"][0]["model_version"] == promoted.model_version
        assert (cache.hits, cache.misses) == (1, 0)


def test_earlier_regions_sent_with_a_click_do_not_change_the_answer(server):
    """Label Studio sends the task's earlier annotations, predictions and drafts with each click; the server
    leaves them unparsed and answers exactly as for the bare task."""
    from engine.integrations.labelstudio import brush_result

    region = brush_result(np.ones((H, W), bool), H, W)
    bare = _predict_body()
    heavy = _predict_body()
    heavy["tasks"][0].update(annotations=[{"id": 1, "result": [region] * 300}], predictions=[{"result": [region]}],
                             drafts=[{"result": [region]}])
    (code_a, a), (code_b, b) = _request(server, "POST", "/predict", bare), _request(server, "POST", "/predict", heavy)
    assert code_a == code_b == 200
    for answer in (a, b):  # region ids are random per answer
        answer["results"][0]["result"][0].pop("id")
    assert a == b
