"""Test-only torchvision.transforms shim (see ../../README.md): the three transforms Meta's sam2 package builds
(`SAM2Transforms`: ToTensor, then a scripted Resize((S, S)) + Normalize), in plain torch."""
from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class ToTensor:
    """(H, W, C) uint8 array -> (C, H, W) float in [0, 1], as torchvision's."""

    def __call__(self, pic) -> torch.Tensor:
        arr = np.asarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return x.float().div(255) if x.dtype == torch.uint8 else x.float()


class Resize(nn.Module):
    """Resize a (..., H, W) float tensor to `size` (h, w): bilinear with antialiasing, torchvision's tensor
    default (its kernel is torch's own `_upsample_bilinear2d_aa`)."""

    def __init__(self, size: List[int]):
        super().__init__()
        self.size = [int(s) for s in size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        y = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return y.squeeze(0) if squeeze else y


class Normalize(nn.Module):
    def __init__(self, mean: List[float], std: List[float]):
        super().__init__()
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std
