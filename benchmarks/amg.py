"""Benchmark: our automatic mask generator vs Meta's `SamAutomaticMaskGenerator`, and the Ray stage.

1. Generator. The same weights for both: a Meta-format SAM `.pth` (`--checkpoint`, e.g. a real
   sam_vit_b on a GPU machine; by default a small SAM built in Meta's classes, see `crafted_sam`)
   loaded by Meta's code and by our `.pth` loader; the same parameters (SAM's defaults but
   `--points-per-side`); the same synthetic images. Images are run alternately (reference, ours)
   so a shared machine's load hits both alike. Agreement: share of reference masks matched by one
   of ours at IoU >= 0.9 (reference masks covering >= 95 % of the image are left out: the SA-1B
   rule we apply drops them on purpose; how many were left out is printed).
2. Ray stage: `run_auto_stage` with 1 and then 2 actors (0.5 CPU, 1 torch thread each) over the
   same images into fresh stores; images/s ratio and masks/s written by the 2-actor run.

Last line: JSON with speedup_vs_reference, agreement, ray_scaling_2v1, masks_per_s.

    python benchmarks/amg.py [--images 4] [--size 512] [--points-per-side 16] [--ray-images 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.synth import write_synthetic_dataset  # noqa: E402
from model.amg import AmgParams, generate_masks  # noqa: E402
from model.segmenter import Segmenter  # noqa: E402
from storage.rle import decode_rles  # noqa: E402
from tests.sam_reference_shim import import_segment_anything  # noqa: E402


def crafted_sam(seed: int = 0, logit_gain: float = 3000.0, iou_shift: float = 0.9):
    """A small SAM in Meta's classes: 256 px ViT (2 blocks, 16x16 embedding), SAM's decoder at width 64.

    No trained weights can be fetched here. Random weights give logits near 0 and predicted IoUs
    near 0, so SAM's filters would drop everything; the mask hypernetworks' last layers are scaled
    by `logit_gain` and the IoU head shifted by `iou_shift` so that SAM's default thresholds keep
    a SAM-like share of candidates. Both implementations get exactly these weights.
    """
    import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    dim = 64
    encoder = ImageEncoderViT(depth=2, embed_dim=64, img_size=256, patch_size=16, num_heads=2, mlp_ratio=4,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=8,
                              out_chans=dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    sam = Sam(image_encoder=encoder,
              prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(16, 16),
                                           input_image_size=(256, 256), mask_in_chans=16),
              mask_decoder=MaskDecoder(transformer_dim=dim, iou_head_hidden_dim=64, num_multimask_outputs=3,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=256,
                                                                     num_heads=8)))
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_gain)
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(iou_shift)
    return sam.eval()


def load_reference(checkpoint: str):
    """Meta's Sam for a .pth, its size read from the shapes the same way our loader reads them."""
    from model.checkpoints import meta_arch

    import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    arch = meta_arch(state, checkpoint)
    v, d, size = arch["vision"], arch["decoder"], arch["image_size"]
    grid, dim = size // v["patch_size"], arch["prompt_dim"]
    encoder = ImageEncoderViT(depth=v["num_hidden_layers"], embed_dim=v["hidden_size"], img_size=size,
                              patch_size=v["patch_size"], num_heads=v["num_attention_heads"],
                              mlp_ratio=v["mlp_dim"] / v["hidden_size"], qkv_bias=v["qkv_bias"], use_rel_pos=True,
                              global_attn_indexes=v["global_attn_indexes"], window_size=v["window_size"],
                              out_chans=dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    sam = Sam(image_encoder=encoder,
              prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                           input_image_size=(size, size), mask_in_chans=d["mask_input_channels"]),
              mask_decoder=MaskDecoder(transformer_dim=dim, iou_head_hidden_dim=d["iou_head_hidden_dim"],
                                       num_multimask_outputs=3,
                                       transformer=TwoWayTransformer(depth=d["depth"], embedding_dim=dim,
                                                                     mlp_dim=d["mlp_dim"], num_heads=d["heads"])))
    sam.load_state_dict(state)
    return sam.eval()


def agreement(ref_masks: np.ndarray, our_masks: np.ndarray, iou: float = 0.9) -> tuple[int, int]:
    """(reference masks matched by one of ours at IoU >= iou, reference masks). Masks: (N, H, W) bool."""
    if len(ref_masks) == 0:
        return 0, 0
    if len(our_masks) == 0:
        return 0, len(ref_masks)
    a = ref_masks.reshape(len(ref_masks), -1).astype(np.float32)
    b = our_masks.reshape(len(our_masks), -1).astype(np.float32)
    inter = a @ b.T
    ious = inter / np.maximum(a.sum(1)[:, None] + b.sum(1)[None] - inter, 1)
    return int((ious.max(1) >= iou).sum()), len(ref_masks)


def bench_generator(args, checkpoint: str, images: list[np.ndarray]) -> dict:
    sa = import_segment_anything()
    sam = load_reference(checkpoint)
    ours = Segmenter.load(checkpoint)
    kw = dict(points_per_side=args.points_per_side, points_per_batch=64)
    reference = sa.SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **kw)
    params = AmgParams(**kw)
    generate_masks(ours, images[0][:64, :64].copy(), params)  # warm-up (allocator, lazy init) for both
    reference.generate(images[0][:64, :64].copy())
    t_ref = t_ours = 0.0
    matched = total = left_out = n_ref = n_ours = 0
    for img in images:
        t = time.perf_counter()
        ref = reference.generate(img)
        t_ref += time.perf_counter() - t
        t = time.perf_counter()
        got = generate_masks(ours, img, params)
        t_ours += time.perf_counter() - t
        h, w = img.shape[:2]
        ref_masks = np.stack([r["segmentation"] for r in ref]) if ref else np.zeros((0, h, w), bool)
        big = ref_masks.sum(axis=(1, 2)) >= 0.95 * h * w
        left_out += int(big.sum())
        m, n = agreement(ref_masks[~big], decode_rles([g.rle for g in got]) if got else np.zeros((0, h, w), bool))
        matched, total = matched + m, total + n
        n_ref, n_ours = n_ref + len(ref), n_ours + len(got)
        print(f"  image {img.shape[1]}x{img.shape[0]}: reference {len(ref)} masks, ours {len(got)}; "
              f"matched {m}/{n}", flush=True)
    out = dict(reference_s_per_image=t_ref / len(images), ours_s_per_image=t_ours / len(images),
               speedup_vs_reference=t_ref / t_ours, agreement=matched / total if total else None,
               reference_masks=n_ref, our_masks=n_ours, reference_masks_left_out_ge95pct=left_out)
    print(f"generator: reference {out['reference_s_per_image']:.2f} s/image, ours {out['ours_s_per_image']:.2f} "
          f"s/image -> {out['speedup_vs_reference']:.2f}x; agreement {matched}/{total}", flush=True)
    return out


def bench_ray(args, checkpoint: str, images_dir: Path, work: Path) -> dict:
    from engine.cluster import init_ray, shutdown_ray
    from engine.config import load_config
    from stages.auto import run_auto_stage

    init_ray("local", num_cpus=2)
    results = {}
    try:
        for actors in (1, 2):
            cfg = load_config(None, {
                "workdir": str(work / f"ray{actors}"), "images.source": str(images_dir),
                "storage.root": str(work / f"ray{actors}" / "store"), "model.checkpoint": checkpoint,
                "ray.num_cpus": 2, "ray.cpus_per_actor": 0.5, "stages.auto.num_actors": actors,
                "stages.auto.points_per_side": args.points_per_side, "stages.auto.images_per_commit": 4})
            s = run_auto_stage(cfg, 1, None, show_progress=False)
            results[actors] = s
            print(f"ray: {actors} actor(s): {s['images']} images in {s['seconds']:.1f} s = "
                  f"{s['images_per_s']:.3f} images/s, {s['masks']} masks", flush=True)
    finally:
        shutdown_ray()
    two = results[2]
    return dict(ray_scaling_2v1=results[2]["images_per_s"] / results[1]["images_per_s"],
                masks_per_s=two["masks"] / two["seconds"], ray_images_per_s_1=results[1]["images_per_s"],
                ray_images_per_s_2=two["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a Meta-format SAM .pth (default: the crafted small SAM)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--ray-images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench-amg-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(work / "crafted_sam.pth")
            torch.save(crafted_sam().state_dict(), checkpoint)
        write_synthetic_dataset(work / "data", n_images=max(args.images, args.ray_images), seed=0, size=args.size)
        files = sorted((work / "data" / "images").iterdir())
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files[:args.images]]
        print(f"{args.images} images {args.size}px, points_per_side={args.points_per_side}, "
              f"torch threads={args.threads}, device=cpu (no GPU on this machine)", flush=True)
        gen = bench_generator(args, checkpoint, images)
        ray_dir = work / "ray-images"
        ray_dir.mkdir()
        for f in files[:args.ray_images]:
            (ray_dir / f.name).write_bytes(f.read_bytes())
        ray = bench_ray(args, checkpoint, ray_dir, work)
    result = {**gen, **ray}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
