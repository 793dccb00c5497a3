"""The transformers edge: SAM's prompt encoder and mask decoder (and its ViT) from `transformers`.

Nothing else in the project imports transformers' SAM classes. `SamNet` holds an image encoder
(any module mapping (B, 3, S, S) normalised pixels to (B, C, h, w) embeddings) plus SAM's prompt
encoder and mask decoder, and decodes many prompts against cached embeddings.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.models.sam.configuration_sam import (
    SamConfig,
    SamMaskDecoderConfig,
    SamPromptEncoderConfig,
    SamVisionConfig,
)
from transformers.models.sam.modeling_sam import (
    SamMaskDecoder,
    SamModel,
    SamPositionalEmbedding,
    SamPromptEncoder,
    SamVisionEncoder,
)


def sam_config(image_size: int, embed_size: int, prompt_dim: int, decoder: dict,
               vision: dict | None = None) -> SamConfig:
    """A transformers `SamConfig` for our sizes.

    image_size: side S of the (padded, square) encoder input in pixels; embed_size: side of the
    (C, h, h) embedding grid; prompt_dim: C. The positional-embedding width is C // 2 (transformers
    takes it from the *vision* config, hence `num_pos_feats`).
    """
    vision = dict(vision or {})
    vision.setdefault("hidden_size", 32)
    vision.setdefault("num_hidden_layers", 1)
    vision.setdefault("num_attention_heads", 1)
    vision.setdefault("patch_size", image_size // embed_size)
    vision.update(image_size=image_size, output_channels=prompt_dim, num_pos_feats=prompt_dim // 2)
    return SamConfig(
        vision_config=SamVisionConfig(**vision),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=prompt_dim, image_size=image_size, patch_size=image_size // embed_size,
            mask_input_channels=decoder.get("mask_input_channels", 16)),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=prompt_dim, mlp_dim=decoder.get("mlp_dim", 2048),
            num_hidden_layers=decoder.get("depth", 2), num_attention_heads=decoder.get("heads", 8),
            iou_head_depth=3, iou_head_hidden_dim=decoder.get("iou_head_hidden_dim", 256)),
    )


def vit_encoder(config: SamConfig) -> nn.Module:
    """SAM's ViT image encoder (transformers' `SamVisionEncoder`) returning (B, C, h, w)."""
    return _VitEncoder(SamVisionEncoder(config.vision_config))


class _VitEncoder(nn.Module):
    def __init__(self, vit: SamVisionEncoder):
        super().__init__()
        self.vit = vit

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit(pixels).last_hidden_state


class SamNet(nn.Module):
    """Image encoder + SAM prompt encoder + SAM mask decoder.

    Coordinates handed to `decode` are pixels of the resized (not yet padded) S×S encoder input.

    The surface every network of the Segmenter has (SamNet, Sam2Net, SamHQNet): `image_encoder` (pixels -> the
    embedding, or a tuple (embedding, *extras) of per-image features the decoder also reads), `decode`,
    `dense_pe`, `image_size`, `embed_size`, `prompt_dim`, `family` and `resize` ("pad": SAM's longest side to S
    and zero padding; "squash": SAM 2's S×S resize).
    """

    resize = "pad"
    family = "sam"

    def __init__(self, image_encoder: nn.Module, config: SamConfig, reinit_pe: bool = True):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
        self.prompt_encoder = SamPromptEncoder(config)
        self.prompt_encoder.shared_embedding = self.shared_image_embedding  # one table, as in SAM
        # Standalone use of transformers' attention modules needs the implementation named explicitly.
        config.mask_decoder_config._attn_implementation = "sdpa"
        self.mask_decoder = SamMaskDecoder(config.mask_decoder_config)
        if reinit_pe:
            # SAM's random-Fourier positional encoding uses unit-variance frequencies; transformers'
            # default init (std = hidden/2) is only a placeholder for loaded weights and makes
            # from-scratch training see pure noise.
            with torch.no_grad():
                self.shared_image_embedding.positional_embedding.normal_(0.0, 1.0)
        self.image_size = int(config.prompt_encoder_config.image_size)
        self.embed_size = int(config.prompt_encoder_config.image_embedding_size)
        self.prompt_dim = int(config.prompt_encoder_config.hidden_size)

    @classmethod
    def from_sam_model(cls, model: SamModel) -> "SamNet":
        """Take the parts of a loaded transformers `SamModel` (weights kept)."""
        net = cls(_VitEncoder(model.vision_encoder), model.config, reinit_pe=False)
        net.shared_image_embedding.load_state_dict(model.shared_image_embedding.state_dict())
        net.prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
        net.mask_decoder = model.mask_decoder
        return net

    def dense_pe(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the embedding grid."""
        n = self.embed_size
        p = self.shared_image_embedding.positional_embedding
        grid = torch.ones((n, n), device=p.device, dtype=p.dtype)
        y = (grid.cumsum(0) - 0.5) / n
        x = (grid.cumsum(1) - 0.5) / n
        return self.shared_image_embedding(torch.stack([x, y], dim=-1)).permute(2, 0, 1)[None]

    def decode(self, embeddings: torch.Tensor, points: torch.Tensor | None, labels: torch.Tensor | None,
               boxes: torch.Tensor | None, mask_input: torch.Tensor | None,
               multimask: bool, pe: torch.Tensor | None = None, extras: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt per row (SAM has no per-image `extras`).

        embeddings: (P, C, h, w) (expanded views are fine); points: (P, K, 2) input-frame px;
        labels: (P, K); boxes: (P, 4) XYXY input-frame px; mask_input: (P, 1, 4h, 4w) logits;
        pe: (P, C, h, w) positional encodings of a window of the grid (None: the whole grid).
        Returns low-res logits (P, M, 4h, 4w) and IoU predictions (P, M), M = 3 if multimask else 1.
        """
        sparse, dense = self.prompt_encoder(
            input_points=None if points is None else points[:, None],
            input_labels=None if labels is None else labels[:, None],
            input_boxes=None if boxes is None else boxes[:, None],
            input_masks=mask_input,
        )
        n, _, h, w = embeddings.shape
        if dense.shape[0] != n:
            dense = dense.expand(n, -1, -1, -1)
        dense = dense[..., :h, :w]  # the no-mask embedding is one vector broadcast over the grid
        pe = self.dense_pe().expand(n, -1, -1, -1) if pe is None else pe
        masks, iou = self.mask_decoder(
            image_embeddings=embeddings, image_positional_embeddings=pe,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)
        return masks[:, 0], iou[:, 0]


def load_hf_sam(directory: Path) -> SamNet:
    """A transformers SAM directory (config.json + weights) -> SamNet. Raises what transformers raises."""
    model = SamModel.from_pretrained(str(directory), local_files_only=True)
    return SamNet.from_sam_model(model.eval())


def hf_model_type(directory: Path) -> str | None:
    """The `model_type` in a transformers config.json, or None if there is none."""
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (ValueError, OSError):
        return None
