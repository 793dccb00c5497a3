"""SAM 3's promptable concept segmentation: a noun phrase -> every instance of that concept in an image.

The SAM 3 edge: nothing else imports transformers' `Sam3Model`. `ConceptSegmenter.load` takes a transformers
SAM 3 directory (model_type "sam3": config.json, weights, and the tokenizer files that ship with it); nothing
is downloaded. The image is embedded once (`embed`), then each phrase costs the text encoder and the detector
(`segment`). Pre-processing as `Sam3ImageProcessor`'s (which needs torchvision, so it is not used): the image
resized to S×S (bilinear, antialiased), scaled to [0, 1], normalised by the processor's mean / std (0.5 each
unless the directory's preprocessor_config.json says otherwise). Post-processing as its
`post_process_instance_segmentation`: score = sigmoid(query logit) × sigmoid(presence logit), kept above
`score_thresh`; mask = sigmoid(logits resized to the image) > `mask_thresh`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from model.checkpoints import CheckpointError
from storage.backend import sha256_file


@dataclass
class ConceptEmbedding:
    """vision: the model's vision-encoder output for one image; original_size: (H, W)."""

    vision: object
    original_size: tuple[int, int]


@dataclass
class ConceptMask:
    """mask: (H, W) bool; score: P(instance of the phrase) in [0, 1]; box: XYXY pixels."""

    mask: np.ndarray
    score: float
    box: list[float]


class ConceptSegmenter:
    """A SAM 3 detector with its tokenizer: `embed` images, then `segment(emb, "bottle")`."""

    def __init__(self, model, tokenizer, model_version: str, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.model_version = model_version
        self.device = torch.device(device)
        self.image_size = int(model.config.vision_config.backbone_config.image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.text_length = int(getattr(model.config.text_config, "max_position_embeddings", 32))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "ConceptSegmenter":
        """A transformers SAM 3 directory -> ConceptSegmenter. Raises CheckpointError (one line)."""
        p = Path(path)
        cfg = p / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{p}: not a transformers directory (no config.json)")
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{cfg}: unreadable ({type(e).__name__})") from None
        if model_type != "sam3":
            raise CheckpointError(f"{p}: concept prompts need a SAM 3 model (model_type 'sam3'), got {model_type!r}")
        weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
        if not weights:
            raise CheckpointError(f"{p}: no weights file (*.safetensors or *.bin) next to config.json")
        from transformers import AutoTokenizer, Sam3Model

        try:
            model = Sam3Model.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # transformers raises many kinds; the user needs one line naming the dir
            raise CheckpointError(f"{p}: transformers could not load it ({type(e).__name__}: {e})"
                                  .replace("\n", " ")[:500]) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{p}: no usable tokenizer files beside the model ({type(e).__name__}: {e})"
                                  .replace("\n", " ")[:500]) from None
        mean = std = (0.5, 0.5, 0.5)
        pre = p / "preprocessor_config.json"
        if pre.is_file():
            doc = json.loads(pre.read_text())
            mean, std = tuple(doc.get("image_mean", mean)), tuple(doc.get("image_std", std))
        return cls(model, tokenizer, f"sam3-hf-{sha256_file(weights[0])[:12]}", mean, std, device)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> ConceptEmbedding:
        """(H, W, 3) uint8 RGB -> the vision features of the S×S resized image."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        pixels = ((x - self.mean) / self.std).to(self.device)
        return ConceptEmbedding(self.model.get_vision_features(pixel_values=pixels), tuple(image.shape[:2]))

    def tokens(self, phrase: str) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([phrase], padding="max_length", max_length=self.text_length, truncation=True,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    @torch.no_grad()
    def raw(self, emb: ConceptEmbedding, phrase: str):
        """The model's output for one phrase (pred_logits (1, Q), presence_logits (1, 1), pred_masks
        (1, Q, h, w) logits, pred_boxes (1, Q, 4) XYXY in [0, 1])."""
        return self.model(vision_embeds=emb.vision, **self.tokens(phrase))

    def segment(self, emb: ConceptEmbedding, phrase: str, score_thresh: float = 0.5, mask_thresh: float = 0.5,
                max_instances: int = 100) -> list[ConceptMask]:
        """Every instance of `phrase` the model finds, best score first (at most `max_instances`); empty masks
        are left out."""
        if not phrase.strip():
            raise ValueError("phrase: empty")
        out = self.raw(emb, phrase)
        scores = out.pred_logits[0].sigmoid()
        if getattr(out, "presence_logits", None) is not None:
            scores = scores * out.presence_logits[0].sigmoid()
        keep = (scores > score_thresh).nonzero().flatten()
        keep = keep[scores[keep].argsort(descending=True)][:max_instances]
        if len(keep) == 0:
            return []
        H, W = emb.original_size
        logits = F.interpolate(out.pred_masks[0, keep][None].float(), (H, W), mode="bilinear", align_corners=False)[0]
        masks = (logits.sigmoid() > mask_thresh).cpu().numpy()
        boxes = (out.pred_boxes[0, keep].float().cpu() * torch.tensor([W, H, W, H])).tolist()
        return [ConceptMask(m, float(s), [float(v) for v in b])
                for m, s, b in zip(masks, scores[keep].cpu().tolist(), boxes) if m.any()]
