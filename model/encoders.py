"""Image encoders: the compact CPU encoder, and the configurations of SAM's ViT presets.

The compact encoder is a small ResNet-style conv net with a feature-pyramid merge: strided convs
to 1/16 of the input, then the coarse (large receptive field) features are upsampled and added to
the fine ones at the output stride. Convolutions learn shapes and edges from scratch in minutes on
a CPU, where a ViT of similar cost does not (see docs/model.md for the measurements).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# SAM's ViT presets (Meta's build_sam.py): embed dim, depth, heads, global attention layers.
VIT_PRESETS: dict[str, dict] = {
    "sam-vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      global_attn_indexes=[2, 5, 8, 11]),
    "sam-vit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      global_attn_indexes=[5, 11, 17, 23]),
    "sam-vit-h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                      global_attn_indexes=[7, 15, 23, 31]),
}

# The compact preset, chosen by measurement (docs/model.md).
COMPACT_DEFAULT: dict = dict(image_size=128, widths=[32, 48, 96, 128], out_stride=8, prompt_dim=64,
                             decoder=dict(mlp_dim=256, depth=2, heads=4, iou_head_hidden_dim=64))


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) map (as SAM's neck uses)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class CompactEncoder(nn.Module):
    """(B, 3, S, S) normalised pixels -> (B, out_dim, S / out_stride, S / out_stride).

    widths: channels at strides 2, 4, 8, 16. out_stride: 4, 8 or 16.
    """

    def __init__(self, widths: list[int], out_stride: int, out_dim: int):
        super().__init__()
        if out_stride not in (4, 8, 16):
            raise ValueError(f"compact encoder: out_stride must be 4, 8 or 16, got {out_stride}")
        w2, w4, w8, w16 = widths
        self.stem = _conv_bn(3, w2, 2)
        self.s4 = nn.Sequential(_conv_bn(w2, w4, 2), _ResBlock(w4))
        self.s8 = nn.Sequential(_conv_bn(w4, w8, 2), _ResBlock(w8))
        self.s16 = nn.Sequential(_conv_bn(w8, w16, 2), _ResBlock(w16), _ResBlock(w16))
        self.out_stride = out_stride
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(w, out_dim, 1)
                                      for s, w in ((4, w4), (8, w8), (16, w16)) if s >= out_stride})
        self.neck = nn.Sequential(nn.Conv2d(out_dim, out_dim, 3, 1, 1, bias=False), LayerNorm2d(out_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # channels-last input: oneDNN's convolutions run ~10 % faster on it on these CPUs (the
        # weights stay contiguous, so checkpoints are unchanged)
        f4 = self.s4(self.stem(pixels.contiguous(memory_format=torch.channels_last)))
        f8 = self.s8(f4)
        f16 = self.s16(f8)
        feats = {4: f4, 8: f8, 16: f16}
        out = self.lateral["16"](f16)
        for s in (8, 4):
            if s < self.out_stride:
                break
            lat = self.lateral[str(s)](feats[s])
            out = lat + F.interpolate(out, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        return self.neck(out).contiguous()
