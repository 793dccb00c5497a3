"""Click -> mask through our ML backend over HTTP, with a warm embedding cache.

    python benchmarks/ml_backend.py [--size 1024 --clicks 60 --checkpoint DIR]

Starts the backend on 127.0.0.1 (a fresh compact model unless --checkpoint), warms the embedding of
one image, then times /predict round trips (HTTP + JSON + decoder + upsampling + brush RLE) for
single-click and multi-click prompts. Baseline in the same run: the same click with a cold cache
(image embedding included), which is what a backend without a cache pays per click.
The last line is JSON: click_p50_ms, click_p99_ms (warm), model_only_p50_ms (the same prompt in-process,
no HTTP/JSON/RLE) and backend_overhead_p50_ms, cold_click_ms, warm_vs_cold_speedup.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from PIL import Image

    from engine.integrations.labelstudio import keypoint_context
    from engine.integrations.ml_backend import (
        BASIC_USER,
        BackendState,
        EmbeddingCache,
        MaskPredictor,
        MLBackend,
        source_image_loader,
    )
    from engine.integrations.synth import make_scene, scene_rng
    from model.segmenter import Segmenter
    from storage.images import ImageSource

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--clicks", type=int, default=60, help="timed requests per prompt kind")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--preset", default="compact", help="a fresh model of this preset when no --checkpoint")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (fp16: GPU only)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on busy CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="sa-bench-mlb-"))
    image, masks, _ = make_scene(scene_rng(0, 0), args.size)
    for i in range(2):
        Image.fromarray(image).save(folder / f"im{i}.png")
    seg = (Segmenter.load(args.checkpoint, device=args.device) if args.checkpoint
           else Segmenter.new(args.preset, device=args.device)).run_as(args.precision)
    state = BackendState(MaskPredictor(seg, EmbeddingCache(seg)), "bench-token", None)
    state.image_loader = source_image_loader(ImageSource(str(folder)), state=state)
    auth = "Basic " + base64.b64encode(f"{BASIC_USER}:bench-token".encode()).decode()
    h = w = args.size
    rng = np.random.default_rng(0)

    def click(image_id: str, points, labels) -> float:
        body = {"tasks": [{"id": 1, "data": {"image_id": image_id, "image": "", "height": h, "width": w}}],
                "params": {"context": keypoint_context(points, labels, h, w)}}
        req = urllib.request.Request(backend.url + "/predict", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": auth})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        dt = time.perf_counter() - t
        assert out["results"][0]["result"][0]["type"] == "brushlabels"
        return dt * 1e3

    def random_clicks(k: int):
        ys, xs = np.nonzero(masks[rng.integers(len(masks))])
        idx = rng.integers(len(xs), size=k)
        return [(int(xs[i]), int(ys[i])) for i in idx], [1] + [int(v) for v in rng.integers(0, 2, k - 1)]

    with MLBackend(state) as backend:
        cold = click("im1.png", *random_clicks(1))  # embeds im1 first: the no-cache cost of a click
        click("im0.png", *random_clicks(1))  # warm im0
        one = [click("im0.png", *random_clicks(1)) for _ in range(args.clicks)]
        multi = [click("im0.png", *random_clicks(4)) for _ in range(args.clicks)]
        # The same work in-process (cache + decoder + upsampling, no HTTP/JSON/RLE): what the model costs.
        from engine.integrations.ml_backend import Prompt

        load = lambda: None  # noqa: E731  (the embedding is cached)
        direct = []
        for _ in range(args.clicks):
            pts, labs = random_clicks(1)
            t = time.perf_counter()
            state.predictor.predict("im0.png", load, Prompt(np.array(pts, float), np.array(labs), None))
            direct.append((time.perf_counter() - t) * 1e3)
    warm = np.array(one + multi)
    for name, xs in (("1 click", one), ("4 clicks", multi)):
        print(f"{name:9s} p50 {np.percentile(xs, 50):7.1f} ms  p99 {np.percentile(xs, 99):7.1f} ms")
    print(f"cold click (embedding included) {cold:.1f} ms; image {w}x{h}; model {seg.model_version}")
    print(json.dumps({
        "image_size": args.size, "requests": int(warm.size), "model_version": seg.model_version,
        "device": str(seg.device), "precision": seg.precision,
        "click_p50_ms": round(float(np.percentile(warm, 50)), 2),
        "click_p99_ms": round(float(np.percentile(warm, 99)), 2),
        "single_click_p50_ms": round(float(np.percentile(one, 50)), 2),
        "multi_click_p50_ms": round(float(np.percentile(multi, 50)), 2),
        "model_only_p50_ms": round(float(np.percentile(direct, 50)), 2),
        "backend_overhead_p50_ms": round(float(np.percentile(one, 50) - np.percentile(direct, 50)), 2),
        "cold_click_ms": round(cold, 2),
        "warm_vs_cold_speedup": round(cold / float(np.percentile(warm, 50)), 1),
        "cache": {"hits": state.predictor.cache.hits, "misses": state.predictor.cache.misses},
    }))


if __name__ == "__main__":
    main()
