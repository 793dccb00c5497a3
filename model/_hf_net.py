"""What the transformers-wrapped networks (SAM 2 family, SAM-HQ) share: the Segmenter's network surface around a
transformers model held once (`self.model`), its prompt encoder and mask decoder, the grid's positional
encoding and the sizes (see SamNet's docstring in model/_sam_edge.py for the surface)."""
from __future__ import annotations

import torch
from torch import nn


class HFNet(nn.Module):
    def __init__(self, model, family: str, image_encoder: nn.Module, embed_size: int):
        super().__init__()
        self.model = model
        self.family = family
        self.image_encoder = image_encoder  # holds the model unregistered: its weights are saved once, here
        pc = model.config.prompt_encoder_config
        self.image_size = int(pc.image_size)
        self.embed_size = int(embed_size)
        self.prompt_dim = int(pc.hidden_size)

    @property
    def mask_decoder(self):
        return self.model.mask_decoder

    @property
    def prompt_encoder(self):
        return self.model.prompt_encoder

    def dense_pe(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the embedding grid."""
        return self.model.get_image_wide_positional_embeddings()
