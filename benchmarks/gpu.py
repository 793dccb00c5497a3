"""GPU benchmark: image embeddings, the automatic generator and retraining, for SAM ViT-B and ViT-H.

    python benchmarks/gpu.py [--models vit_b,vit_h] [--images 4] [--size 1500] [--budget-s 400]
                             [--compile] [--trained PTH] [--skip-train]

Weights. No weights can be downloaded, so SAM ViT-B / ViT-H are built by Meta's `segment_anything` with its
random initialisation from a fixed seed, saved as a Meta `.pth` and loaded by our loader: both generators run
the same weights. Speed does not depend on the weights' values, but the number of masks that survive the
filters does, so ms per decoded prompt is printed beside ms per image, and the IoU / stability thresholds are
the quantiles of the model's own scores that keep the top 10 % by each (as benchmarks/amg.py does for a young
model). Agreement on random weights is reported, and — the meaningful figure — on trained weights when
`--trained` names a Meta-layout `.pth` of our compact model (benchmarks/amg.py writes one to
benchmarks/.cache/): random weights give soft logits whose masks flip under any perturbation.

Measured, per model, on the same device in one run:
1. Embeddings/s (1024 px inputs, 8 per encoder call): ours in fp32 eager, bf16, bf16 compiled (`--compile`);
   Meta's `SamPredictor.set_image` (fp32, one image per call).
2. The automatic generator on `--images` synthetic scenes of `--size` px, 32 x 32 grid, no crops (Meta's
   defaults otherwise: NMS 0.7, no small-region clean-up): Meta's `SamAutomaticMaskGenerator` in eager fp32
   (its 64 prompts per batch), ours in fp32 and bf16 (decoder batches sized to the GPU's free memory), ms per
   image, masks/s, peak memory; then SA-1B's 2 crop layers for ours (bf16) and Meta's.
   Agreement: share of reference masks matched by one of ours at mask IoU >= 0.9.
3. Retraining (`model.train.train`, bf16, AdamW, 8 masks per image, 1024 px): masks/s, peak memory per GPU,
   and the largest batch of images that fits (doubling until out of memory).
Each part is skipped (and says so) when less than its estimate is left of `--budget-s`.

Last line: one JSON object with embeddings_per_s_vit_h, amg_ms_vit_h, amg_ms_vit_b, speedup_vs_meta,
agreement_vs_fp32, device, and the per-model tables.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.integrations.synth import make_scene, scene_rng  # noqa: E402
from model.amg import device_points_per_batch, generate_masks  # noqa: E402
from model.amg_filters import point_grid, stability_score  # noqa: E402
from model.amg_params import AmgParams  # noqa: E402
from model.segmenter import Segmenter  # noqa: E402
from model.train import TrainSettings, dataset_sampler, train  # noqa: E402
from storage.rle import decode_rles  # noqa: E402

START = time.perf_counter()


def left(budget: float) -> float:
    return budget - (time.perf_counter() - START)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib(reset: bool = False) -> float:
    if not torch.cuda.is_available():
        return 0.0
    value = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(value, 2)


def segment_anything():
    """Meta's package: as it is where torchvision works (a GPU machine), else through the test shim."""
    try:
        import torchvision  # noqa: F401

        torchvision.ops.nms(torch.zeros((1, 4)), torch.zeros(1), 0.5)
        import segment_anything
        return segment_anything
    except Exception:  # noqa: BLE001 - no usable torchvision: the test shim stands in for it
        from tests.sam_reference_shim import import_segment_anything
        return import_segment_anything()


def thresholds(seg: Segmenter, keep: float = 0.1, stability_floor: float = 0.5) -> tuple[float, float]:
    """IoU / stability thresholds that each keep the top `keep` share of the model's own candidates; the
    stability threshold is at least `stability_floor`: random weights make speckle masks (stability ~0) whose
    RLE has millions of runs, which made the first H200 run spend minutes encoding noise in both generators."""
    ious, stabs = [], []
    for i in range(2):
        img = make_scene(scene_rng(9, i), 512)[0]
        emb = seg.embed([img])[0]
        pts = point_grid(32) * np.array([512, 512])
        pred = seg.predict(emb, points=pts[:, None], labels=np.ones((len(pts), 1)), upsample=False)
        ious.append(pred.iou_pred.flatten().cpu().numpy())
        stabs.append(stability_score(pred.low_res_logits.flatten(0, 1), 0.0, 1.0).cpu().numpy())
    q = 100 * (1 - keep)
    return (float(np.percentile(np.concatenate(ious), q)),
            max(stability_floor, float(np.percentile(np.concatenate(stabs), q))))


def matched(ref_rles: list[dict], got_rles: list[dict]) -> tuple[int, int]:
    """(reference masks matched by one of ours at IoU >= 0.9, reference masks)."""
    from model.iou import pairwise_mask_iou

    if not ref_rles:
        return 0, 0
    if not got_rles:
        return 0, len(ref_rles)
    return int((pairwise_mask_iou(decode_rles(ref_rles), decode_rles(got_rles)).max(1) >= 0.9).sum()), len(ref_rles)


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median seconds of `repeat` calls of fn (after one warm-up call), and the last result."""
    out = fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def embeddings(seg: Segmenter, sam, sa, images: list[np.ndarray], compile_too: bool) -> dict:
    out = {}
    batch = [images[i % len(images)] for i in range(8)]
    for mode, (precision, comp) in {"fp32": ("fp32", False), "bf16": ("bf16", False),
                                    "bf16_compiled": ("bf16", True)}.items():
        if comp and not compile_too:
            continue
        seg.run_as(precision, comp)
        peak_gib(reset=True)
        t, _ = timed(lambda: seg.embed(batch, batch_size=8), 3)
        out[f"ours_{mode}_per_s"] = round(len(batch) / t, 2)
        out[f"ours_{mode}_peak_gib"] = peak_gib()
    seg.run_as("fp32")
    predictor = sa.SamPredictor(sam)
    t, _ = timed(lambda: [predictor.set_image(im) for im in batch[:4]], 2)
    out["meta_fp32_per_s"] = round(4 / t, 2)
    return out


def automatic(seg: Segmenter, sam, sa, images: list[np.ndarray], thr: tuple[float, float], crop_layers: int,
              modes: tuple[str, ...], compile_too: bool) -> dict:
    """Meta's generator vs ours on the same images and weights; ms per image, masks/s, agreement."""
    # SA-1B's crops: layer i has (2^i)^2 crops with a grid of 32 / 2^i points per side
    kw = dict(points_per_side=32, pred_iou_thresh=thr[0], stability_score_thresh=thr[1], box_nms_thresh=0.7,
              crop_n_layers=crop_layers, crop_n_points_downscale_factor=2 if crop_layers else 1,
              min_mask_region_area=0)
    out = {"prompts_per_image": sum(4 ** i * (32 // 2 ** i) ** 2 for i in range(crop_layers + 1))}
    prompts = out["prompts_per_image"]
    meta = sa.SamAutomaticMaskGenerator(sam, points_per_batch=64, output_mode="coco_rle", **kw)
    meta.generate(images[0][:256, :256].copy())
    peak_gib(reset=True)
    t_meta, ref = 0.0, []
    for img in images:
        sync()
        t = time.perf_counter()
        ref.append([r["segmentation"] for r in meta.generate(img)])
        sync()
        t_meta += time.perf_counter() - t
    out["meta_fp32_ms"] = round(1e3 * t_meta / len(images), 1)
    out["meta_masks_per_image"] = round(sum(map(len, ref)) / len(images), 1)
    out["meta_peak_gib"] = peak_gib(reset=True)
    results = {}
    for mode in modes:
        precision, comp = ("bf16", True) if mode == "bf16_compiled" else (mode, False)
        if comp and not compile_too:
            continue
        seg.run_as(precision, comp)
        params = AmgParams(points_per_batch=device_points_per_batch(seg, 64), **kw)
        generate_masks(seg, images[0], params)  # warm-up (and compilation)
        peak_gib(reset=True)
        t_ours, got = 0.0, []
        for img in images:
            sync()
            t = time.perf_counter()
            got.append([m.rle for m in generate_masks(seg, img, params)])
            sync()
            t_ours += time.perf_counter() - t
        ms = 1e3 * t_ours / len(images)
        n = sum(map(len, got))
        results[mode] = got
        m = [matched(r, g) for r, g in zip(ref, got)]
        out[f"ours_{mode}_ms"] = round(ms, 1)
        out[f"ours_{mode}_us_per_prompt"] = round(1e3 * ms / prompts, 2)
        out[f"ours_{mode}_masks_per_s"] = round(n / (t_ours or 1e-9), 1)
        out[f"ours_{mode}_masks_per_image"] = round(n / len(images), 1)
        out[f"ours_{mode}_peak_gib"] = peak_gib()
        out[f"ours_{mode}_points_per_batch"] = params.points_per_batch
        out[f"agreement_{mode}_vs_meta"] = round(sum(a for a, _ in m) / max(1, sum(b for _, b in m)), 4)
        out[f"speedup_{mode}_vs_meta"] = round(t_meta / (t_ours or 1e-9), 2)
    seg.run_as("fp32")
    for mode in results:
        if mode != "fp32" and "fp32" in results:
            m = [matched(r, g) for r, g in zip(results["fp32"], results[mode])]
            out[f"agreement_{mode}_vs_fp32"] = round(sum(a for a, _ in m) / max(1, sum(b for _, b in m)), 4)
    return out


def retraining(seg: Segmenter, budget_s: float) -> dict:
    """Fine-tuning throughput in bf16: masks/s at batch 4, and the largest batch that fits."""
    scenes = [make_scene(scene_rng(21, i), 1024) for i in range(8)]
    data = dataset_sampler([s[0] for s in scenes], [s[1] for s in scenes])
    seg.run_as("bf16")
    out = {}
    settings = TrainSettings(max_steps=6, minutes=10, batch_images=4, masks_per_image=8, crop_share=0.0,
                             optimizer="adamw", lr=1e-5, ema_decay=None, threads=None)
    train(seg, data, TrainSettings(**{**settings.__dict__, "max_steps": 1}))  # warm-up
    peak_gib(reset=True)
    sync()
    t = time.perf_counter()
    r = train(seg, data, settings)
    sync()
    dt = time.perf_counter() - t
    out["train_masks_per_s"] = round(r.steps * 4 * 8 / dt, 1)
    out["train_peak_gib_batch4"] = peak_gib(reset=True)
    largest = None
    for b in (8, 16, 32, 64):
        if left(budget_s) < 20:
            out["largest_batch_note"] = "stopped early: time budget"
            break
        try:
            train(seg, data, TrainSettings(**{**settings.__dict__, "max_steps": 1, "batch_images": b}))
            largest = b
            out[f"train_peak_gib_batch{b}"] = peak_gib(reset=True)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
    out["largest_batch_images"] = largest
    seg.run_as("fp32")
    return out


def report(summary: dict, partial: str | None, model: str, part: str | None) -> None:
    """Print a part's figures as they come, and keep the figures so far in `partial` (a run cut short by a
    time limit still leaves them)."""
    row = summary[model] if part is None else summary[model][part]
    print(model, part or "", row, f"({time.perf_counter() - START:.0f} s)", flush=True)
    if partial:
        Path(partial).write_text(json.dumps(summary))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_b,vit_h", help="vit_b, vit_h, vit_l; tiny: a CPU smoke test")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=1500)
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd paths (ViT-B only: "
                                                          "compiling ViT-H takes minutes)")
    ap.add_argument("--trained", default=None, help="Meta-layout .pth of a trained compact model (agreement)")
    ap.add_argument("--skip-train", default="", help="comma-separated models whose retraining is not measured")
    ap.add_argument("--compile-amg", action="store_true", help="also time the compiled generator (slow to compile)")
    ap.add_argument("--partial", default=None, help="write the figures so far to this JSON file after each part")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; random weights (seed 0) for ViT-B/H", flush=True)
    sa = segment_anything()
    images = [make_scene(scene_rng(7, i), args.size)[0] for i in range(args.images)]
    summary: dict = {"device": name, "weights": "random (seed 0)", "images": args.images, "size": args.size}
    tmp = Path(tempfile.mkdtemp(prefix="sa-gpu-"))
    if args.trained:  # first: quick, and the agreement figure that means something
        try:
            seg = Segmenter.load(args.trained, device=device)
            from tests.sam_reference_shim.builders import load_meta_reference

            sam = load_meta_reference(args.trained).to(device).eval()
            small = [make_scene(scene_rng(7, i), 512)[0] for i in range(args.images)]
            thr = thresholds(seg, stability_floor=0.0)  # trained: its own quantiles, as measured on 2026-12-04
            summary["trained_compact"] = automatic(seg, sam, sa, small, thr, 0, ("fp32", "bf16"), False)
            report(summary, args.partial, "trained_compact", None)
        except Exception as e:  # noqa: BLE001
            summary["trained_compact"] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    for model in [m for m in args.models.split(",") if m]:
        row: dict = {}
        summary[model] = row
        try:
            torch.manual_seed(0)
            if model == "tiny":  # a smoke test of this script on a CPU
                from tests.sam_reference_shim.builders import meta_vit_sam
                sam = meta_vit_sam()
            else:
                sam = sa.sam_model_registry[model](checkpoint=None)
            pth = tmp / f"{model}.pth"
            torch.save(sam.state_dict(), pth)
            sam = sam.to(device).eval()
            seg = Segmenter.load(pth, device=device)
            thr = thresholds(seg)
            row["thresholds"] = [round(v, 4) for v in thr]
            compile_too = args.compile and model in ("vit_b", "tiny")
            row["embeddings"] = embeddings(seg, sam, sa, images, compile_too)
            report(summary, args.partial, model, "embeddings")
            row["amg"] = automatic(seg, sam, sa, images, thr, 0, ("fp32", "bf16", "bf16_compiled"),
                                   compile_too and args.compile_amg)
            report(summary, args.partial, model, "amg")
            if left(args.budget_s) > 60:
                row["amg_crops2"] = automatic(seg, sam, sa, images[:1], thr, 2, ("bf16",), False)
                report(summary, args.partial, model, "amg_crops2")
            if model not in args.skip_train.split(",") and left(args.budget_s) > 45:
                row["train"] = retraining(seg, args.budget_s)
                report(summary, args.partial, model, "train")
            del sam, seg
            torch.cuda.empty_cache() if device == "cuda" else None
        except Exception as e:  # noqa: BLE001 - one model's failure is reported, the rest goes on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc()
    vh, vb = summary.get("vit_h", {}), summary.get("vit_b", {})
    best = lambda amg: min((v for k, v in amg.items() if k.startswith("ours_") and k.endswith("_ms")),  # noqa: E731
                           default=None)
    emb_h = vh.get("embeddings", {})
    agreement = summary.get("trained_compact", {}).get("agreement_bf16_vs_fp32",
                                                       vb.get("amg", {}).get("agreement_bf16_vs_fp32"))
    summary.update(
        embeddings_per_s_vit_h=max([v for k, v in emb_h.items() if k.endswith("_per_s") and k.startswith("ours")],
                                   default=None),
        amg_ms_vit_h=best(vh.get("amg", {})), amg_ms_vit_b=best(vb.get("amg", {})),
        speedup_vs_meta=max([v for k, v in vh.get("amg", {}).items() if k.startswith("speedup_")], default=None),
        agreement_vs_fp32=agreement, seconds=round(time.perf_counter() - START, 1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
