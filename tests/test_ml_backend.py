"""Our ML backend: the protocol, credentials, the embedding cache, and Label Studio calling it."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from engine.integrations.labelstudio import LabelStudio, LabelStudioError, TaskImage, keypoint_context
from engine.integrations.ml_backend import (
    BASIC_USER,
    BackendState,
    EmbeddingCache,
    MaskPredictor,
    MLBackend,
    load_embedding,
    precompute_embeddings,
    prompt_from_context,
    source_image_loader,
)
from model.segmenter import Segmenter
from storage.brush_rle import decode_mask
from storage.images import ImageSource

torch.set_num_threads(1)
TOKEN = "backend-secret"
H, W = 60, 80


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("mlb") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        px = np.full((H, W, 3), 30, np.uint8)
        px[10 + 5 * i:40, 20:60] = rng.integers(150, 255, 3)
        Image.fromarray(px).save(folder / f"im{i}.png")
    return ImageSource(str(folder))


@pytest.fixture(scope="module")
def backend(images, tmp_path_factory):
    seg = Segmenter.new("compact")
    emb_dir = tmp_path_factory.mktemp("emb")
    assert precompute_embeddings(seg, [("im0.png", images.load(images.ref("im0.png")).pixels)], emb_dir) == 1
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg, precomputed_dir=emb_dir)), TOKEN, None)
    state.image_loader = source_image_loader(images, state=state)
    with MLBackend(state) as b:
        yield b


def _call(url: str, path: str, body: dict | None = None, auth: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json", **({"Authorization": auth} if auth else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _task(image_id: str) -> dict:
    return {"id": 7, "data": {"image_id": image_id, "image": "/unused", "height": H, "width": W}}


def test_credentials_are_required(backend):
    assert _call(backend.url, "/health")[0] == 401
    assert _call(backend.url, "/health", auth=_basic(BASIC_USER, "wrong"))[0] == 401
    assert _call(backend.url, "/health", auth=_basic("someone", TOKEN))[0] == 401
    assert _call(backend.url, "/predict", {"tasks": []}, auth="Token nope")[0] == 401
    code, body = _call(backend.url, "/health", auth=_basic(BASIC_USER, TOKEN))
    assert code == 200 and body["status"] == "UP"
    assert _call(backend.url, "/health", auth=f"Bearer {TOKEN}")[0] == 200


def test_setup_webhook_and_batch_predict(backend):
    auth = f"Token {TOKEN}"
    code, body = _call(backend.url, "/setup", {"project": "1.1", "hostname": "http://h", "access_token": "t"}, auth)
    assert code == 200 and body["model_version"] == backend.state.predictor.model_version
    assert backend.state.ls_hostname == "http://h"
    assert _call(backend.url, "/webhook", {"action": "ANNOTATION_CREATED"}, auth) == (200, {"status": "ok"})
    assert _call(backend.url, "/predict", {"tasks": [_task("im0.png")]}, auth) == (200, {"results": []})


def test_interactive_predict_returns_a_brush_mask_from_cached_embeddings(backend):
    auth = _basic(BASIC_USER, TOKEN)
    cache = backend.state.predictor.cache
    before = (cache.precomputed, cache.misses)
    ctx = keypoint_context([(40, 25)], [1], H, W)
    code, body = _call(backend.url, "/predict", {"tasks": [_task("im0.png")], "params": {"context": ctx}}, auth)
    assert code == 200
    (res,) = body["results"]
    region = res["result"][0]
    assert region["type"] == "brushlabels" and (region["original_width"], region["original_height"]) == (W, H)
    assert res["model_version"] == backend.state.predictor.model_version
    mask = decode_mask(region["value"]["rle"], H, W)
    assert mask.shape == (H, W) and mask.dtype == bool
    assert (cache.precomputed, cache.misses) == (before[0] + 1, before[1] + 1)  # read from disk, not embedded
    ctx2 = keypoint_context([(40, 25), (5, 5)], [1, 0], H, W)
    code, body = _call(backend.url, "/predict", {"tasks": [_task("im0.png")], "params": {"context": ctx2}}, auth)
    assert code == 200 and cache.misses == before[1] + 1  # the second click hits the cache
    code, body = _call(backend.url, "/predict", {"tasks": [_task("im1.png")], "params": {"context": ctx}}, auth)
    assert code == 200 and cache.precomputed == before[0] + 1  # im1 had no precomputed embedding


def test_bad_requests_get_a_400_with_the_reason(backend):
    auth = f"Token {TOKEN}"
    code, _ = _call(backend.url, "/predict", {"tasks": [_task("im0.png")], "params": {"context": {"result": [
        {"type": "choices", "value": {}}]}}}, auth)
    assert code == 400 and "no keypoints" in backend.state.last_error


def test_context_percentages_become_pixels():
    ctx = {"result": [
        {"type": "keypointlabels", "original_width": 200, "original_height": 100, "is_positive": True,
         "value": {"x": 50.25, "y": 10.5, "keypointlabels": ["positive"]}},
        {"type": "keypointlabels", "original_width": 200, "original_height": 100, "is_positive": False,
         "value": {"x": 10, "y": 10, "keypointlabels": ["negative"]}},
        {"type": "rectanglelabels", "original_width": 200, "original_height": 100,
         "value": {"x": 10, "y": 20, "width": 50, "height": 30}}]}
    p = prompt_from_context(ctx, 100, 200)
    assert np.allclose(p.points, [[100.0, 10.0], [19.5, 9.5]]) and p.labels.tolist() == [1, 0]
    assert np.allclose(p.box, [20, 20, 120, 50])
    with pytest.raises(ValueError, match="no keypoints"):
        prompt_from_context({"result": []}, 100, 200)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "192.0.2.1"])
def test_refuses_to_bind_anything_but_loopback_unless_told(host):
    with pytest.raises(ValueError, match="not a loopback address"):
        MLBackend(None, host=host)


class _Listener:
    """A loopback HTTP server that records every request it gets (a stand-in for any other host)."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.requests = []
        png = self.png = _png_bytes()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                seen.append((self.path, self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _png_bytes() -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_task_images_come_only_from_the_configured_label_studio(images):
    """A task without a stored image: its URL is fetched only from the configured Label Studio (with the token
    Label Studio handed over in /setup); any other host, another port, or file:// gets a 400 and nothing."""
    trusted, other = _Listener(), _Listener()
    seg = Segmenter.new("compact")
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), TOKEN, None)
    state.image_loader = source_image_loader(images, trusted_ls_url=trusted.url, state=state)
    ctx = keypoint_context([(40, 25)], [1], H, W)

    def task(url):
        return {"id": 9, "data": {"image": url, "height": H, "width": W}}

    try:
        with MLBackend(state) as backend:
            auth = f"Token {TOKEN}"
            assert _call(backend.url, "/setup", {"hostname": other.url, "access_token": "ls-secret"}, auth)[0] == 200
            for url in (f"{other.url}/x.png", "file:///etc/passwd", f"file://{images.uri}/im0.png",
                        "http://127.0.0.1:1/x.png", trusted.url.replace("127.0.0.1", "localhost") + "/x.png",
                        f"{trusted.url}:99/x.png", "ftp://127.0.0.1/x.png"):
                code, _ = _call(backend.url, "/predict", {"tasks": [task(url)], "params": {"context": ctx}}, auth)
                assert code == 400 and "refusing to fetch" in backend.state.last_error, url
            assert other.requests == [] and trusted.requests == []
            code, body = _call(backend.url, "/predict", {"tasks": [task("/data/upload/1/x.png")],
                                                         "params": {"context": ctx}}, auth)
            assert code == 200 and body["results"]
            assert trusted.requests == [("/data/upload/1/x.png", "Token ls-secret")] and other.requests == []
    finally:
        trusted.close()
        other.close()


def test_malformed_requests_are_4xx_and_never_hang(backend):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(backend.url)
    auth = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}
    cases = [({"Content-Length": "-1"}, b""), ({"Content-Length": str(2**40)}, b"{}"),
             ({"Content-Length": "abc"}, b""), ({}, b"[1, 2]"), ({}, b'{"tasks": "x", "params": {}}'),
             ({}, b'{"tasks": [], "params": "x"}'), ({}, b"not json")]
    for headers, body in cases:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        h = {**auth, **headers}
        h.setdefault("Content-Length", str(len(body)))
        conn.putrequest("POST", "/predict")
        for k, v in h.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body and int(h["Content-Length"]) >= 0 and h["Content-Length"].isdigit() and int(h["Content-Length"]) < 2**30:
            conn.send(body)
        # A body larger than the server takes is refused as such before it is read
        assert conn.getresponse().status == (413 if h["Content-Length"] == str(2**40) else 400), headers or body
        conn.close()


@pytest.mark.labelstudio
def test_label_studio_calls_our_backend_for_interactive_clicks(backend, images, labelstudio_server):
    ls: LabelStudio = labelstudio_server.client
    pid = ls.ensure_project("ml backend via label studio")
    try:
        folder = images.ref("im0.png").uri.rsplit("/", 1)[0]
        ls.add_local_storage(pid, folder)
        im = TaskImage("im0.png", LabelStudio.local_file_url(images.ref("im0.png").uri,
                                                             labelstudio_server.document_root), H, W)
        task_id = ls.import_tasks(pid, [im])["im0.png"]
        served = backend.state.predictions
        backend_id = ls.connect_ml_backend(pid, backend.url, BASIC_USER, TOKEN)
        assert backend.state.ls_hostname  # Label Studio called /setup with credentials
        answer = ls.predict_interactive(backend_id, task_id, keypoint_context([(40, 25)], [1], H, W))
        assert backend.state.predictions == served + 1
        mask = decode_mask(answer["result"][0]["value"]["rle"], H, W)
        assert mask.shape == (H, W) and answer["model_version"] == backend.state.predictor.model_version
    finally:
        ls.delete_project(pid)
    # Label Studio connecting with the wrong credentials is refused by ours, and it says so.
    other = ls.ensure_project("ml backend wrong credentials")
    try:
        with pytest.raises(LabelStudioError, match="authentication parameters"):
            ls.connect_ml_backend(other, backend.url, BASIC_USER, "wrong")
    finally:
        ls.delete_project(other)


def test_backend_port_is_free_again_after_a_with_block():
    # start() followed by `with` (as the stages do) must not leave a second serve loop holding the port.
    from engine.integrations.labelstudio import free_port
    from engine.integrations.ml_backend import BackendState, MLBackend

    port = free_port()
    state = BackendState(None, token="t", image_loader=None)
    for _ in range(3):
        with MLBackend(state, "127.0.0.1", port).start():
            pass


def test_a_running_backend_switches_to_a_newly_promoted_model_without_a_restart(images, tmp_path):
    """The service follows <workdir>/models/current.json: the answers' model_version changes, the server stays."""
    from engine.integrations.ml_backend import ModelFollower

    old, new = Segmenter.new("compact", seed=0), Segmenter.new("compact", seed=1)
    new.save(tmp_path / "r1")
    pointer = tmp_path / "current.json"
    pointer.write_text(json.dumps({"checkpoint": None}))
    current = lambda: json.loads(pointer.read_text())["checkpoint"]  # noqa: E731
    state = BackendState(MaskPredictor(old, EmbeddingCache(old)), TOKEN, None)
    state.image_loader = source_image_loader(images, state=state)
    said = []
    follower = ModelFollower(state, current, Segmenter.load, every=0.1, log=said.append)
    click = {"tasks": [_task("im1.png")], "params": {"context": keypoint_context([(40, 25)], [1], H, W)}}
    with MLBackend(state) as b:
        port = b.port
        assert _call(b.url, "/predict", click, _basic(BASIC_USER, TOKEN))[1]["results"][0]["model_version"] == \
            old.model_version
        assert not follower.check()  # nothing promoted yet
        pointer.write_text(json.dumps({"checkpoint": str(tmp_path / "r1")}))  # a round promotes r1
        follower.start()
        for _ in range(100):
            if follower.switches:
                break
            import time

            time.sleep(0.05)
        follower.stop()
        status, answer = _call(b.url, "/predict", click, _basic(BASIC_USER, TOKEN))
        assert status == 200 and answer["results"][0]["model_version"] == new.model_version != old.model_version
        assert _call(b.url, "/health", None, _basic(BASIC_USER, TOKEN))[1]["model_version"] == new.model_version
        assert b.port == port and said == [f"ML backend: now serving {new.model_version} ({tmp_path / 'r1'})"]
        # a broken checkpoint promoted next is reported once and the model in use goes on serving
        (tmp_path / "broken").mkdir()
        pointer.write_text(json.dumps({"checkpoint": str(tmp_path / "broken")}))
        assert not follower.check() and not follower.check() and len(said) == 2 and "cannot switch" in said[1]
        assert _call(b.url, "/predict", click, _basic(BASIC_USER, TOKEN))[1]["results"][0]["model_version"] == \
            new.model_version


def test_a_stage_uses_the_running_service_and_leaves_it_running(images, tmp_path, monkeypatch):
    """A stage finds the service on labelstudio.ml_backend_port (our token, its model) and uses it instead of a
    backend of its own; leaving the stage's block does not stop it. Another model there: the stage's own
    backend goes beside it (simulated), or the stage says which model runs (people)."""
    import socket

    from engine.integrations import labelling, runtime
    from engine.integrations.config import load_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setattr(labelling, "SERVICE_SWITCH_WAIT_S", 0.5)
    cfg = load_config(None, {"workdir": str(tmp_path / "work"), "labelstudio.ml_backend_port": free})
    token = runtime.ml_backend_token(cfg)
    seg, other = Segmenter.new("compact", seed=0), Segmenter.new("compact", seed=2)
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), token, None)
    state.image_loader = source_image_loader(images, state=state)
    with MLBackend(state, port=free) as service:
        with labelling.start_ml_backend(cfg, seg, images, None) as used:
            assert isinstance(used, labelling.RunningBackend) and used.url == service.url
            assert used.state.token == token
        assert labelling.backend_health(service.url, token)["model_version"] == seg.model_version  # still up
        assert labelling.backend_health(service.url, "not-our-token") is None
        with pytest.raises(LabelStudioError, match=f"serves {seg.model_version}, not this stage's model"):
            labelling.start_ml_backend(cfg, other, images, None, people=True)
        with labelling.start_ml_backend(cfg, other, images, None) as own:  # simulated: its own, beside
            assert isinstance(own, MLBackend) and own.port != free


def test_a_configured_backend_service_url_is_used_and_never_replaced(images, tmp_path):
    """labelstudio.ml_backend_url (docker-compose's http://ml-backend:9099): the stage uses the service there, and
    one that does not answer or serves another model is an error, not a silent stand-in."""
    from engine.integrations import labelling, runtime
    from engine.integrations.config import load_config

    cfg = load_config(None, {"workdir": str(tmp_path / "work")})
    token = runtime.ml_backend_token(cfg)
    seg, other = Segmenter.new("compact", seed=0), Segmenter.new("compact", seed=2)
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), token, None)
    state.image_loader = source_image_loader(images, state=state)
    with MLBackend(state) as service:
        cfg = load_config(None, {"workdir": str(tmp_path / "work"), "labelstudio.ml_backend_url": service.url + "/"})
        with labelling.start_ml_backend(cfg, seg, images, None) as used:
            assert isinstance(used, labelling.RunningBackend) and used.url == service.url
        labelling.SERVICE_SWITCH_WAIT_S, saved = 0.2, labelling.SERVICE_SWITCH_WAIT_S
        try:
            with pytest.raises(LabelStudioError, match=f"serves {seg.model_version}, not this stage's model"):
                labelling.start_ml_backend(cfg, other, images, None)
        finally:
            labelling.SERVICE_SWITCH_WAIT_S = saved
        port = service.port
    cfg = load_config(None, {"workdir": str(tmp_path / "work"),
                             "labelstudio.ml_backend_url": f"http://127.0.0.1:{port}"})
    with pytest.raises(LabelStudioError, match="does not answer with our token"):
        labelling.start_ml_backend(cfg, seg, images, None)


@pytest.mark.parametrize("family", ["sam2", "sam_hq"])
def test_family_models_answer_through_the_backend_from_the_cache_on_disk(images, tmp_path, family):
    """A SAM 2 / SAM-HQ model behind the real HTTP backend: the embedding comes from the precomputed cache (with
    the family's extra features: SAM 2's high-resolution maps, SAM-HQ's early ViT features, stored float16) and
    the brush mask equals the model's own best mask for the click (computed here from a fresh embedding)."""
    from model.checkpoints import build_net
    from model._sam2_edge import sam2_arch
    from tests.test_families import SMALL_HIERA, meta_sam_hq

    if family == "sam2":
        arch = sam2_arch(dict(SMALL_HIERA, window_pos_embed_bkg_spatial_size=[7, 7]), 256, 64)
        seg = Segmenter(build_net(arch), arch, "sam2-test")
    else:
        path = tmp_path / "hq.pth"
        torch.save(meta_sam_hq().state_dict(), path)
        seg = Segmenter.load(path)
    px = images.load(images.ref("im0.png")).pixels
    emb_dir = tmp_path / "emb"
    precompute_embeddings(seg, [("im0.png", px)], emb_dir)
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg, precomputed_dir=emb_dir)), TOKEN, None)
    state.image_loader = source_image_loader(images, state=state)
    with MLBackend(state) as b:
        code, body = _call(b.url, "/predict", {"tasks": [_task("im0.png")],
                                               "params": {"context": keypoint_context([(40, 25)], [1], H, W)}},
                           _basic(BASIC_USER, TOKEN))
    assert code == 200 and state.predictor.cache.precomputed == 1 and state.predictor.cache.misses == 1
    got = decode_mask(body["results"][0]["result"][0]["value"]["rle"], H, W)
    cached = load_embedding(emb_dir, seg.model_version, "im0.png")
    assert len(cached.extras) == len(seg.embed([px])[0].extras) > 0
    pred = seg.predict(cached, points=[[[40.0, 25.0]]], labels=[[1]], upsample=False)
    low = pred.low_res_logits[0, int(pred.iou_pred[0].argmax())]
    assert np.array_equal(got, (seg.upsample_logits(low[None], cached)[0] > 0).numpy())
    fresh = seg.predict(seg.embed([px])[0], points=[[[40.0, 25.0]]], labels=[[1]])
    assert (got == fresh.masks[0, int(fresh.iou_pred[0].argmax())].numpy()).mean() >= 0.98  # float16 cache


def test_the_backends_mask_is_the_models_answer_to_the_click(tmp_path, fitted_compact):
    """Issue 31.14: a click through the HTTP protocol comes back as exactly the mask the model itself gives for
    that click (the best of its 3, decoded from the brush RLE), and for a trained model that mask is the object
    clicked (an empty or constant answer fails here)."""
    from PIL import Image

    from model.clicks import first_click
    from model.iou import mask_iou

    seg, scenes = fitted_compact
    image, truth, _ = scenes[0]
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(image).save(folder / "scene.png")
    source = ImageSource(str(folder))
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), TOKEN, None)
    state.image_loader = source_image_loader(source, state=state)
    h, w = image.shape[:2]
    emb = seg.embed([source.load(source.ref("scene.png")).pixels])[0]
    ious = []
    with MLBackend(state) as backend:
        for obj in truth[:4]:
            x, y = first_click(obj)
            task = {"id": 1, "data": {"image_id": "scene.png", "image": "/unused", "height": h, "width": w}}
            code, body = _call(backend.url, "/predict", {"tasks": [task], "params": {
                "context": keypoint_context([(x, y)], [1], h, w)}}, f"Token {TOKEN}")
            assert code == 200
            got = decode_mask(body["results"][0]["result"][0]["value"]["rle"], h, w)
            p = seg.predict(emb, np.array([[[x, y]]], np.float64), np.ones((1, 1), np.int64), multimask=True)
            want = p.masks.numpy()[0, int(p.iou_pred[0].argmax())]
            assert np.array_equal(got, want)
            ious.append(float(mask_iou(got[None], obj[None])[0]))
    print(f"IoU of the backend's masks with the clicked objects: {ious}")
    assert got.any() and np.mean(ious) >= 0.2
