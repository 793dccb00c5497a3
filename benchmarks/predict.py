"""Prompt decoding speed against a cached embedding: our Segmenter beside Meta's segment-anything.

Measures (1 thread, CPU): one point prompt -> masks at the original size, p50/p99 latency; and prompts/s
decoding batches of 64 point prompts. For the compact preset, and for a small ViT SAM (Meta's own
modeling classes) that both implementations load from the same .pth — the reference figures come
from `SamPredictor.predict_torch` in the same run. Last line: JSON (p50_ms, p99_ms, prompts_per_s:
compact; reference_prompts_per_s: Meta on the small ViT; vit_*: ours on the same ViT; then, per family, the
tiny test configs of tests/test_families.py — sam2_* against Meta's `SAM2ImagePredictor._predict`, sam_hq_*
against segment-anything-hq's `SamPredictor.predict_torch`, each on the same weights, single-mask answers).
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
from tests.sam_reference_shim import import_reference  # noqa: E402
from tests.test_families import SMALL_HIERA, meta_sam2, meta_sam_hq, save_meta_sam2  # noqa: E402
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
    with tempfile.TemporaryDirectory() as d:
        family_figures(results, image, pts, labs, args, Path(d))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


def family_figures(results: dict, image: np.ndarray, pts: np.ndarray, labs: np.ndarray, args, tmp: Path) -> None:
    """prompts/s of our Segmenter and of Meta's predictor for SAM 2 and SAM-HQ on the same tiny weights."""
    reps = max(3, args.repeats // 10)
    lb = torch.ones(args.batch, 1, dtype=torch.int64)
    import_reference("sam2")
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    meta = meta_sam2(SMALL_HIERA)
    ours = Segmenter.load(save_meta_sam2(meta, tmp / "sam2_small.pt", SMALL_HIERA))
    emb = ours.embed([image])[0]
    pred = SAM2ImagePredictor(meta)
    pred.set_image(image)
    coords = pred._transforms.transform_coords(torch.tensor(pts, dtype=torch.float32), normalize=True,
                                               orig_hw=pred._orig_hw[0])

    def ref2():
        with torch.no_grad():
            pred._predict(coords, lb, multimask_output=False)

    results["sam2_prompts_per_s"] = throughput(lambda: ours.predict(emb, pts, labs, multimask=False), args.batch, reps)
    results["sam2_reference_prompts_per_s"] = throughput(ref2, args.batch, reps)
    sa = import_reference("segment_anything_hq")
    hq = meta_sam_hq()
    torch.save(hq.state_dict(), tmp / "hq.pth")
    ours = Segmenter.load(tmp / "hq.pth")
    emb = ours.embed([image])[0]
    predictor = sa.SamPredictor(hq)
    predictor.set_image(image)
    tpb = predictor.transform.apply_coords_torch(torch.tensor(pts, dtype=torch.float32), predictor.original_size)

    def ref_hq():
        with torch.no_grad():
            predictor.predict_torch(tpb, lb, multimask_output=False)

    results["sam_hq_prompts_per_s"] = throughput(lambda: ours.predict(emb, pts, labs, multimask=False), args.batch, reps)
    results["sam_hq_reference_prompts_per_s"] = throughput(ref_hq, args.batch, reps)
    for f in ("sam2", "sam_hq"):
        results[f"{f}_vs_reference_throughput"] = results[f"{f}_prompts_per_s"] / results[f"{f}_reference_prompts_per_s"]
        print(f"{f} (tiny, same weights): ours {results[f + '_prompts_per_s']:.0f} prompts/s, reference "
              f"{results[f + '_reference_prompts_per_s']:.0f} prompts/s", flush=True)


if __name__ == "__main__":
    main()
