"""Prompt decoding speed against a cached embedding: our Segmenter beside Meta's segment-anything.

Measures (1 thread, CPU): one point prompt -> masks at the original size, p50/p99 latency; and prompts/s
decoding batches of 64 point prompts. For the compact preset, and for a small ViT SAM (Meta's own
modeling classes) that both implementations load from the same .pth — the reference figures come
from `SamPredictor.predict_torch` in the same run. Last line: JSON (p50_ms, p99_ms, prompts_per_s:
compact; reference_prompts_per_s: Meta on the small ViT; vit_*: ours on the same ViT).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.segmenter import Segmenter  # noqa: E402
from tests.test_parity_reference import build_reference_sam  # noqa: E402


def latency_ms(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput(fn, n_prompts: int, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_prompts * repeats / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="compact checkpoint (default: an untrained compact model)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    one_pt, one_lab = np.array([[[100.0, 120.0]]]), np.ones((1, 1))
    pts = rng.uniform(0, 255, (args.batch, 1, 2))
    labs = np.ones((args.batch, 1))
    results: dict = {"threads": 1, "image": "256x256", "batch": args.batch}

    compact = Segmenter.load(args.checkpoint) if args.checkpoint else Segmenter.new("compact")
    emb = compact.embed([image])[0]
    results["p50_ms"], results["p99_ms"] = latency_ms(lambda: compact.predict(emb, one_pt, one_lab), args.repeats)
    results["prompts_per_s"] = throughput(lambda: compact.predict(emb, pts, labs), args.batch, max(3, args.repeats // 10))
    print(f"compact: one prompt p50 {results['p50_ms']:.1f} ms p99 {results['p99_ms']:.1f} ms; "
          f"{results['prompts_per_s']:.0f} prompts/s at batch {args.batch}", flush=True)

    sa, sam = build_reference_sam()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "small_vit.pth"
        torch.save(sam.state_dict(), path)
        vit = Segmenter.load(path)
    vemb = vit.embed([image])[0]
    predictor = sa.SamPredictor(sam)
    predictor.set_image(image)
    tp1 = predictor.transform.apply_coords_torch(torch.tensor(one_pt, dtype=torch.float32), predictor.original_size)
    tpb = predictor.transform.apply_coords_torch(torch.tensor(pts, dtype=torch.float32), predictor.original_size)
    l1, lb = torch.ones(1, 1, dtype=torch.int64), torch.ones(args.batch, 1, dtype=torch.int64)

    def ref_one():
        with torch.no_grad():
            predictor.predict_torch(tp1, l1, multimask_output=True)

    def ref_batch():
        with torch.no_grad():
            predictor.predict_torch(tpb, lb, multimask_output=True)

    results["vit_p50_ms"], results["vit_p99_ms"] = latency_ms(lambda: vit.predict(vemb, one_pt, one_lab), args.repeats)
    results["reference_p50_ms"], results["reference_p99_ms"] = latency_ms(ref_one, args.repeats)
    results["vit_prompts_per_s"] = throughput(lambda: vit.predict(vemb, pts, labs), args.batch, max(3, args.repeats // 10))
    results["reference_prompts_per_s"] = throughput(ref_batch, args.batch, max(3, args.repeats // 10))
    results["vit_vs_reference_throughput"] = results["vit_prompts_per_s"] / results["reference_prompts_per_s"]
    print(f"small ViT (same weights): ours p50 {results['vit_p50_ms']:.1f} ms, {results['vit_prompts_per_s']:.0f} prompts/s; "
          f"reference p50 {results['reference_p50_ms']:.1f} ms, {results['reference_prompts_per_s']:.0f} prompts/s", flush=True)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
