"""Meta `segment_anything` models for parity tests and benchmarks: one builder, shared.

- `meta_vit_sam`: a small ViT SAM in Meta's classes (optionally "crafted": random weights scaled
  so that SAM's default filters keep some masks and drop others).
- `meta_sam_around(segmenter)`: Meta's `Sam` running *our* compact encoder (Meta's `Sam` only calls
  `image_encoder(x)` on the normalised, padded input and reads `image_encoder.img_size`) with our
  prompt-encoder / decoder weights copied under Meta's names.
- `save_meta_pth` / `load_meta_reference`: a Meta-layout `.pth` both sides load (ours through
  `model.checkpoints`), so both run exactly the same weights.
"""
from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import torch

from tests.sam_reference_shim import import_segment_anything


def _prompt_and_decoder(dim: int, image_size: int, grid: int, decoder: dict):
    import_segment_anything()
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
                           mask_in_chans=decoder.get("mask_input_channels", 16))
    mask_decoder = MaskDecoder(transformer_dim=dim, iou_head_hidden_dim=decoder["iou_head_hidden_dim"],
                               num_multimask_outputs=3,
                               transformer=TwoWayTransformer(depth=decoder["depth"], embedding_dim=dim,
                                                             mlp_dim=decoder["mlp_dim"], num_heads=decoder["heads"]))
    return prompt, mask_decoder


def meta_vit_sam(image_size: int = 128, patch_size: int = 8, embed_dim: int = 32, depth: int = 1, heads: int = 2,
                 mlp_ratio: float = 2, global_attn_indexes: tuple[int, ...] = (0,), window_size: int = 0,
                 dim: int = 32, decoder: dict | None = None, seed: int = 0,
                 logit_gain: float | None = None, iou_shift: float = 0.0):
    """A ViT SAM in Meta's classes, in eval mode.

    Random weights give logits near 0 (every stability score 0) and predicted IoUs near 0; when
    `logit_gain` is given the mask hypernetworks' last layers are scaled by it and `iou_shift` is
    added to the IoU head's output, so SAM's default filters keep some candidates and drop some.
    """
    import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, Sam

    torch.manual_seed(seed)
    decoder = decoder or dict(mlp_dim=2 * dim, depth=2, heads=8, iou_head_hidden_dim=dim)
    grid = image_size // patch_size
    encoder = ImageEncoderViT(depth=depth, embed_dim=embed_dim, img_size=image_size, patch_size=patch_size,
                              num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True, use_rel_pos=True,
                              global_attn_indexes=list(global_attn_indexes), window_size=window_size,
                              out_chans=dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    sam = Sam(encoder, *_prompt_and_decoder(dim, image_size, grid, decoder))
    if logit_gain is not None:
        with torch.no_grad():
            for mlp in sam.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(logit_gain)
            sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(iou_shift)
    return sam.eval()


def meta_sam_around(segmenter):
    """Meta's `Sam` with a copy of our segmenter's compact encoder and its decoder weights (Meta names).

    segmenter: a `model.segmenter.Segmenter` with arch["encoder"] == "compact".
    """
    import_segment_anything()
    from segment_anything.modeling import Sam

    from model.checkpoints import map_meta_state

    arch = segmenter.arch
    if arch.get("encoder") != "compact":
        raise ValueError(f"meta_sam_around: expects the compact encoder, got {arch.get('encoder')!r}")
    size = int(arch["image_size"])
    encoder = copy.deepcopy(segmenter.net.image_encoder)
    encoder.img_size = size  # all Meta's Sam reads of its encoder besides calling it
    sam = Sam(encoder, *_prompt_and_decoder(int(arch["prompt_dim"]), size, size // int(arch["out_stride"]),
                                            arch["decoder"]))
    ours = segmenter.net.state_dict()
    to_ours = map_meta_state({k: k for k in sam.state_dict()}, vit_encoder=False)  # our name -> Meta name
    sam.load_state_dict({meta: ours[mine] for mine, meta in to_ours.items()}, strict=True)
    return sam.eval()


def save_meta_pth(sam, path: str | Path, arch: dict | None = None) -> Path:
    """Write Meta's state dict (wrapped with our architecture when the encoder is ours)."""
    from model.checkpoints import META_ARCH_KEY

    state = {k: v.detach().clone() for k, v in sam.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state if arch is None else {"model": state, META_ARCH_KEY: arch}, tmp)
    tmp.replace(path)
    return path


def load_meta_reference(path: str | Path):
    """Meta's `Sam` for a `.pth`: Meta's ViT (sizes read from the shapes as our loader reads them) or,
    for a file naming our compact architecture, Meta's `Sam` around our compact encoder."""
    import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, Sam

    from model.checkpoints import META_ARCH_KEY, build_net, compact_arch, meta_arch

    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    named = obj.get(META_ARCH_KEY) if isinstance(obj, dict) else None
    state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if isinstance(named, dict) and named.get("encoder") == "compact":
        arch = compact_arch(**{k: v for k, v in named.items() if k not in ("encoder", "preset")})
        size = int(arch["image_size"])
        encoder = build_net(arch).image_encoder
        encoder.img_size = size
        sam = Sam(encoder, *_prompt_and_decoder(int(arch["prompt_dim"]), size, size // int(arch["out_stride"]),
                                                arch["decoder"]))
    else:
        arch = meta_arch(state, str(path))
        v, size = arch["vision"], arch["image_size"]
        encoder = ImageEncoderViT(depth=v["num_hidden_layers"], embed_dim=v["hidden_size"], img_size=size,
                                  patch_size=v["patch_size"], num_heads=v["num_attention_heads"],
                                  mlp_ratio=v["mlp_dim"] / v["hidden_size"], qkv_bias=v["qkv_bias"], use_rel_pos=True,
                                  global_attn_indexes=v["global_attn_indexes"], window_size=v["window_size"],
                                  out_chans=arch["prompt_dim"], norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
        sam = Sam(encoder, *_prompt_and_decoder(arch["prompt_dim"], size, size // v["patch_size"], arch["decoder"]))
    sam.load_state_dict(state, strict=True)
    return sam.eval()
