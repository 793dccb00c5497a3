"""The SAM-HQ edge: SAM-HQ through `transformers` (`SamHQModel`), and Meta-layout SAM-HQ `.pth` checkpoints.

Nothing else in the project imports transformers' SAM-HQ classes. `SamHQNet` gives the Segmenter SamNet's
surface; its encoder also returns the early ViT features (the output of the first global-attention block, as
SAM-HQ's decoder fuses them into its high-quality output token), cached with the embedding.

The decoder's forward pass is ours (`hq_decode`), on transformers' modules and weights: transformers 5.25's
`SamHQMaskDecoder.forward` upscales the image embedding from *before* its two-way transformer (it discards the
transformer's image output), so its masks differ from Meta's by up to 0.3 in logits on the same weights, while
its IoU predictions agree; ours follows Meta's `MaskDecoderHQ`, which the parity tests check.

Multimask answers: Meta's SAM-HQ returns one mask for a multimask prompt (the best of SAM's three, plus the HQ
token's logits). We return transformers' three (SAM's three, each plus the HQ logits, best first), so the first
of ours is Meta's answer (tests/test_families.py) and the automatic generator still sees three candidates.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from model._hf_net import HFNet

_HQ_RULES: list[tuple[str, str]] = [
    (r"^mask_decoder\.hf_token\.", "mask_decoder.hq_token."),
    (r"^mask_decoder\.compress_vit_feat\.0\.", "mask_decoder.compress_vit_conv1."),
    (r"^mask_decoder\.compress_vit_feat\.1\.", "mask_decoder.compress_vit_norm."),
    (r"^mask_decoder\.compress_vit_feat\.3\.", "mask_decoder.compress_vit_conv2."),
    (r"^mask_decoder\.embedding_encoder\.0\.", "mask_decoder.encoder_conv1."),
    (r"^mask_decoder\.embedding_encoder\.1\.", "mask_decoder.encoder_norm."),
    (r"^mask_decoder\.embedding_encoder\.3\.", "mask_decoder.encoder_conv2."),
    (r"^mask_decoder\.embedding_maskfeature\.0\.", "mask_decoder.mask_conv1."),
    (r"^mask_decoder\.embedding_maskfeature\.1\.", "mask_decoder.mask_norm."),
    (r"^mask_decoder\.embedding_maskfeature\.3\.", "mask_decoder.mask_conv2."),
]


def is_meta_hq_state(state: dict) -> bool:
    return "mask_decoder.hf_token.weight" in state


def hq_config(sam_cfg, vit_dim: int):
    """A transformers `SamHQConfig` from a `SamConfig` of the same sizes plus the ViT width SAM-HQ fuses."""
    from transformers import SamHQConfig

    d = sam_cfg.to_dict()
    d["mask_decoder_config"]["vit_dim"] = int(vit_dim)
    for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        d[part].pop("model_type", None)
    cfg = SamHQConfig(vision_config=d["vision_config"], prompt_encoder_config=d["prompt_encoder_config"],
                      mask_decoder_config=d["mask_decoder_config"])
    cfg._attn_implementation = "sdpa"
    return cfg


def map_meta_hq_state(state: dict[str, torch.Tensor], map_meta_state) -> dict[str, torch.Tensor]:
    """Rename a Meta SAM-HQ state dict to transformers' SamHQModel names (`map_meta_state`: SAM 1's renaming,
    which covers everything SAM-HQ shares with SAM)."""
    hq, rest = {}, {}
    for k, v in state.items():
        for pattern, repl in _HQ_RULES:
            if re.search(pattern, k):
                hq[re.sub(pattern, repl, k)] = v
                break
        else:
            if k.startswith("mask_decoder.hf_mlp."):
                hq[k] = v
            else:
                rest[k] = v
    out = {}
    for k, v in map_meta_state(rest).items():
        out[re.sub(r"^image_encoder\.vit\.", "vision_encoder.", k)] = v
    depth = 1 + max(int(m.group(1)) for k in hq if (m := re.match(r"mask_decoder\.hf_mlp\.layers\.(\d+)\.", k)))
    for k, v in hq.items():
        m = re.match(r"mask_decoder\.hf_mlp\.layers\.(\d+)\.(.+)$", k)
        if m:
            j = int(m.group(1))
            k = f"mask_decoder.hq_mask_mlp.{'proj_in' if j == 0 else 'proj_out' if j == depth - 1 else f'layers.{j - 1}'}.{m.group(2)}"
        out[k] = v
    return out


class _HQEncoder(nn.Module):
    """pixels (B, 3, S, S) -> (embedding (B, C, h, w), early ViT features (B, D, h, w))."""

    def __init__(self, vision_encoder):
        super().__init__()
        object.__setattr__(self, "vit", vision_encoder)  # not a submodule: the net holds (and saves) it once

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vit(pixels)
        return out.last_hidden_state, out.intermediate_embeddings[0].permute(0, 3, 1, 2)


class SamHQNet(HFNet):
    """A transformers `SamHQModel` as the Segmenter's network (SAM 1's pre- and post-processing)."""

    resize = "pad"

    def __init__(self, model, arch: dict):
        super().__init__(model, "sam_hq", _HQEncoder(model.vision_encoder),
                         model.config.prompt_encoder_config.image_embedding_size)

    def decode(self, embeddings: torch.Tensor, points, labels, boxes, mask_input, multimask: bool,
               pe: torch.Tensor | None = None, extras: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """As SamNet.decode; extras = (early ViT features (P, D, h, w),). Rows that share one image (an expanded
        view, no mask prompts) are decoded as one image with P prompts, so the HQ features are made once."""
        if pe is not None:
            raise ValueError("SAM-HQ: decoding against a window of the grid (crop training) is not supported")
        (vit,) = extras
        n = embeddings.shape[0]
        shared = n > 1 and embeddings.stride(0) == 0 and vit.stride(0) == 0 and mask_input is None
        sparse, dense = self.model.prompt_encoder(
            input_points=None if points is None else points[:, None],
            input_labels=None if labels is None else labels[:, None],
            input_boxes=None if boxes is None else boxes[:, None],
            input_masks=mask_input)
        if sparse is None:  # a mask prompt alone: no sparse tokens
            sparse = torch.zeros(n, 1, 0, self.prompt_dim, device=embeddings.device, dtype=embeddings.dtype)
        if shared:
            emb, interm, sparse = embeddings[:1], vit[:1], sparse.reshape(1, n, *sparse.shape[-2:])
            dense = dense[:1]
        else:
            emb, interm, sparse = embeddings, vit, sparse.reshape(n, 1, *sparse.shape[-2:])
            if dense.shape[0] != n:
                dense = dense.expand(n, -1, -1, -1)
        masks, iou = hq_decode(self.model.mask_decoder, emb, self.dense_pe(), sparse, dense, multimask, interm)
        return masks.reshape(n, *masks.shape[2:]), iou.reshape(n, -1)


def hq_decode(dec, image: torch.Tensor, pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
              multimask: bool, vit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's MaskDecoderHQ on transformers' SamHQMaskDecoder modules.

    image: (B, C, h, w); pe: (1, C, h, w); sparse: (B, P, K, C) prompt tokens; dense: (B, C, h, w);
    vit: (B, D, h, w) early ViT features. Returns logits (B, P, M, 4h, 4w) — SAM's masks plus the HQ token's,
    M = 3 (best predicted IoU first) or 1 — and IoU predictions (B, P, M)."""
    b, c, h, w = image.shape
    p = sparse.shape[1]
    # HQ features: the embedding and the early ViT features, both upscaled 4x (once per image)
    hq = dec.encoder_conv2(dec.activation(dec.encoder_norm(dec.encoder_conv1(image))))
    hq = hq + dec.compress_vit_conv2(dec.activation(dec.compress_vit_norm(dec.compress_vit_conv1(vit))))
    # Two-way transformer over [IoU, 4 mask tokens, HQ token, prompts] and the image
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, dec.hq_token.weight])
    tokens = torch.cat([tokens.expand(b, p, -1, -1), sparse], dim=2).to(dec.iou_token.weight.dtype)
    src = (image + dense).repeat_interleave(p, 0)
    pos = pe.expand(b * p, -1, -1, -1)
    queries, keys = dec.transformer(point_embeddings=tokens, image_embeddings=src, image_positional_embeddings=pos,
                                    attention_similarity=None)
    n_tok = dec.num_mask_tokens  # SAM's 4 mask tokens + the HQ token
    iou_out, mask_out = queries[:, :, 0], queries[:, :, 1:1 + n_tok]
    # Upscale: SAM's path from the transformer's image output; the HQ path adds the HQ features
    src = keys.transpose(2, 3).reshape(b * p, c, h, w)
    up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(src)))
    up = dec.activation(dec.upscale_conv2(up))
    up_hq = dec.mask_conv2(dec.activation(dec.mask_norm(dec.mask_conv1(up)))) + hq.repeat_interleave(p, 0)
    hyper = torch.stack([dec.output_hypernetworks_mlps[i](mask_out[:, :, i]) for i in range(n_tok - 1)]
                        + [dec.hq_mask_mlp(mask_out[:, :, n_tok - 1])], dim=2)  # (B, P, 5, C/8)
    cc = up.shape[1]
    sam = (hyper[:, :, :n_tok - 1] @ up.reshape(b, p, cc, -1)).reshape(b, p, -1, 4 * h, 4 * w)
    hq_mask = (hyper[:, :, n_tok - 1:] @ up_hq.reshape(b, p, cc, -1)).reshape(b, p, 1, 4 * h, 4 * w)
    iou = dec.iou_prediction_head(iou_out)  # (B, P, 4)
    if multimask:
        iou, order = iou[:, :, 1:].sort(dim=2, descending=True)
        sam = torch.gather(sam[:, :, 1:], 2, order[..., None, None].expand(-1, -1, -1, 4 * h, 4 * w))
    else:
        iou, sam = iou[:, :, :1], sam[:, :, :1]
    return sam + hq_mask, iou


def build_hq_net(arch: dict) -> SamHQNet:
    """A SAM-HQ network from an arch dict carrying a transformers config (`hf_config`)."""
    from transformers import SamHQConfig, SamHQModel

    config = SamHQConfig.from_dict(dict(arch["hf_config"]))
    config._attn_implementation = "sdpa"
    return SamHQNet(SamHQModel(config).eval(), arch)


def hq_arch(config, preset: str) -> dict:
    return dict(family="sam_hq", preset=preset, image_size=int(config.prompt_encoder_config.image_size),
                hf_config=config.to_dict())


def load_hf_sam_hq(directory: Path) -> tuple[SamHQNet, dict]:
    from transformers import SamHQModel

    model = SamHQModel.from_pretrained(str(directory), local_files_only=True).eval()
    arch = hq_arch(model.config, "sam_hq-hf")
    return SamHQNet(model, arch), arch
