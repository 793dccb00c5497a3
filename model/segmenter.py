"""The promptable segmenter: embed an image once, then decode many prompts against the embedding.

SAM's pre-processing (resize the longest side to S, normalise, pad to S×S) and post-processing
(upsample the low-res logits to S×S, crop the padding, resize to the original size) in plain torch; for the
SAM 2 family (`net.resize == "squash"`), SAM 2's (resize to S×S, normalise; upsample the low-res logits
straight to the original size). Prompts are pixels of the original image; they are rescaled to the encoder
input here. All outputs are CPU torch tensors. Families: docs/models.md.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from model.checkpoints import CheckpointError, build_net, compact_arch, load_checkpoint, preset_arch, \
    save_checkpoint, state_digest

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
LOW_RES = 256  # side of the low-res logits in the API (SAM's), whatever the network's native size
PROMPT_CHUNK = 64  # prompts decoded at once (bounds memory for big prompt sets)
# Network precision: fp32, or autocast to bf16 / fp16 (weights stay fp32; outputs are returned as fp32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["Segmenter", "ImageEmbedding", "Prediction", "PromptError", "CheckpointError"]


class PromptError(ValueError):
    """Prompts or images that can't be used; the message is one line naming the input and the reason."""


def failure_kind(e: BaseException) -> str:
    """How a model failure on one image is set aside: "transient" for running out of memory (a quieter
    machine or a bigger device may pass), "permanent" for anything else: the same image fails the same way
    on every retry."""
    oom = isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
    return "transient" if oom else "permanent"


@dataclass
class ImageEmbedding:
    """features: (C, h, w); original_size: (H, W) of the image; input_size: (h', w') after resize to S;
    extras: the family's other per-image features the decoder reads (SAM 2: the 1/4 and 1/8 scale features
    (C/8, 4h, 4w), (C/4, 2h, 2w); SAM-HQ: the early ViT features (D, h, w); SAM: none)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    extras: tuple = ()


@dataclass
class Prediction:
    """masks: (N, M, H, W) bool or None; iou_pred: (N, M) float; low_res_logits: (N, M, 256, 256).

    M = 3 with multimask, else 1.
    """

    masks: torch.Tensor | None
    iou_pred: torch.Tensor
    low_res_logits: torch.Tensor


def resized_shape(h: int, w: int, side: int) -> tuple[int, int]:
    """(h', w') with the longest side = `side`, rounded as SAM does."""
    scale = side / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))  # a thin image keeps a pixel across


def check_image(image: object, name: str = "image") -> np.ndarray:
    """Return `image` as (H, W, 3) uint8 or raise PromptError."""
    if not isinstance(image, np.ndarray):
        raise PromptError(f"{name}: expected a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise PromptError(f"{name}: expected shape (H, W, 3), got {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise PromptError(f"{name}: expected dtype uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise PromptError(f"{name}: empty image {tuple(image.shape)}")
    return image


def preprocess(images: list[np.ndarray], side: int, resize: str = "pad") -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(H, W, 3) uint8 images -> (B, 3, S, S) normalised batch and the resized (h', w').
    resize "pad": longest side to S, zero padding (SAM); "squash": every image to S×S (SAM 2)."""
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    out = torch.zeros((len(images), 3, side, side))
    sizes = []
    for i, img in enumerate(images):
        h, w = (side, side) if resize == "squash" else resized_shape(img.shape[0], img.shape[1], side)
        arr = np.ascontiguousarray(img)
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1).float()[None]
        if (h, w) != img.shape[:2]:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            if resize != "squash":  # SAM resizes uint8 images (keep its quantisation); SAM 2 resizes floats
                x = x.round().clamp(0, 255)
        out[i, :, :h, :w] = (x[0] - mean) / std
        sizes.append((h, w))
    return out, sizes


def _as_array(x: object, name: str, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise PromptError(f"{name}: not array-like ({e})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise PromptError(f"{name}: expected numbers, got dtype {arr.dtype}")
    return arr.astype(dtype)


@torch.no_grad()
def localising_init(net, gain: float) -> None:
    """Tie the query and key projections of the decoder's cross-attentions at init (scaled by `gain`).

    SAM's positional encodings are random Fourier features, so the dot product of the encodings
    of two places is a Gaussian-like kernel of their distance. With q = k projections, an image
    token's attention to a point token starts out peaked at the tokens near the click, so the
    click's position reaches the image features from the first step; with independent random
    projections that kernel is scrambled and a from-scratch model first learns empty masks.
    """
    mods = [m for layer in net.mask_decoder.transformer.layers
            for m in (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)]
    mods.append(net.mask_decoder.transformer.final_attn_token_to_image)
    for attn in mods:
        attn.q_proj.weight.mul_(gain)
        attn.k_proj.weight.copy_(attn.q_proj.weight)
        attn.k_proj.bias.zero_()
        attn.q_proj.bias.zero_()


class Segmenter:
    """A SAM-architecture model: `embed` images once, `predict` masks for many prompts."""

    def __init__(self, net, arch: dict, model_version: str, device: str = "cpu", metadata: dict | None = None):
        self.net = net.to(device).eval()
        self.arch = arch
        self.model_version = model_version
        self.device = torch.device(device)
        self.metadata = dict(metadata or {})
        self.image_size = int(net.image_size)
        self.family = getattr(net, "family", "sam")
        self.run_as()

    def run_as(self, precision: str = "fp32", compile: bool = False) -> "Segmenter":
        """How `embed` and `predict` run the network: `precision` fp32, or autocast to bf16 / fp16 (the
        weights stay fp32, outputs come back fp32; masks agree with fp32 ones, tests/test_precision.py), and
        `compile`: torch.compile the encoder and the decoder (the first call of each new shape compiles).
        Returns self."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {sorted(PRECISIONS)}")
        if precision == "fp16" and self.device.type == "cpu":
            # CPU autocast runs normalisation in fp16 (CUDA's keeps it fp32): measured embedding error up to 0.2
            raise ValueError("precision fp16: not on a CPU (normalisation overflows there); use bf16 or fp32")
        self.precision, self.compiled = precision, bool(compile)
        self._encoder = torch.compile(self.net.image_encoder) if compile else self.net.image_encoder
        self._decoder = torch.compile(self.net.decode) if compile else self.net.decode
        return self

    def autocast(self):
        """The autocast context of this segmenter's precision (a no-op for fp32)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def new(cls, preset: str = "compact", device: str = "cpu", seed: int | None = 0, **overrides) -> "Segmenter":
        """An untrained model: preset "compact" (overrides change COMPACT_DEFAULT), "sam-vit-b/l/h",
        "sam-hq-vit-b/l/h" or "sam2.1-hiera-tiny/small/base-plus/large" (`family_presets()`)."""
        if seed is not None:
            torch.manual_seed(seed)
        attn_init = overrides.pop("attn_init", 2.5 if preset == "compact" else 0.0)
        arch = compact_arch(**overrides) if preset == "compact" else preset_arch(preset)
        net = build_net(arch)
        if attn_init:
            localising_init(net, attn_init)
        return cls(net, arch, f"{arch['preset']}-init-{state_digest(net.state_dict())}", device)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Segmenter":
        """Our checkpoint dir, a transformers SAM dir, or a Meta `.pth`. Raises CheckpointError."""
        net, arch, version, meta = load_checkpoint(path)
        return cls(net, arch, version, device, meta)

    def save(self, directory: str | Path, metadata: dict | None = None) -> str:
        """Write safetensors + JSON (round, data fingerprint, metrics… go in metadata). Returns model_version."""
        meta = dict(metadata or {})
        self.model_version = save_checkpoint(self.net, self.arch, directory, meta)
        self.metadata = meta
        return self.model_version

    # ---- images --------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: list[np.ndarray], batch_size: int = 4) -> list[ImageEmbedding]:
        """(H, W, 3) uint8 RGB images -> one ImageEmbedding each (features (C, h, w))."""
        if isinstance(images, np.ndarray):
            raise PromptError("images: expected a list of (H, W, 3) arrays, got one array; wrap it in a list")
        images = [check_image(im, f"images[{i}]") for i, im in enumerate(images)]
        self.net.eval()
        out: list[ImageEmbedding] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels, sizes = preprocess(chunk, self.image_size, self.net.resize)
            with self.autocast():
                feats = self._encoder(pixels.to(self.device))
            feats, extras = (feats, ()) if isinstance(feats, torch.Tensor) else (feats[0], tuple(feats[1:]))
            feats, extras = feats.float(), [e.float() for e in extras]
            for j, (img, f, s) in enumerate(zip(chunk, feats, sizes)):
                out.append(ImageEmbedding(f.clone(), (int(img.shape[0]), int(img.shape[1])), s,
                                          tuple(e[j].clone() for e in extras)))
        return out

    # ---- prompts -------------------------------------------------------------------------------
    def _check_prompts(self, emb: ImageEmbedding, points, labels, boxes, mask_input):
        if not isinstance(emb, ImageEmbedding):
            raise PromptError(f"emb: expected an ImageEmbedding from Segmenter.embed, got {type(emb).__name__}")
        H, W = emb.original_size
        n = None
        if points is None and boxes is None and mask_input is None:
            raise PromptError("prompts: none given (need points, boxes or mask_input)")
        if points is not None:
            pts = _as_array(points, "points", np.float64)
            if pts.ndim != 3 or pts.shape[2] != 2:
                raise PromptError(f"points: expected shape (N, K, 2), got {pts.shape}")
            if labels is None:
                raise PromptError("labels: required with points (1 positive, 0 negative, -1 padding)")
            lab = _as_array(labels, "labels", np.float64)
            if lab.shape != pts.shape[:2]:
                raise PromptError(f"labels: expected shape {pts.shape[:2]} to match points, got {lab.shape}")
            if not np.isfinite(pts).all():
                raise PromptError("points: contain NaN or inf")
            if not np.isin(lab, (-1, 0, 1)).all():
                raise PromptError(f"labels: must be 1, 0 or -1, got {sorted(set(np.unique(lab).tolist()))[:5]}")
            real = lab != -1
            if real.any():
                xs, ys = pts[..., 0][real], pts[..., 1][real]
                if xs.min() < 0 or ys.min() < 0 or xs.max() > W or ys.max() > H:
                    raise PromptError(f"points: outside the {W}x{H} image (x in [{xs.min():.1f}, {xs.max():.1f}], "
                                      f"y in [{ys.min():.1f}, {ys.max():.1f}])")
            n = pts.shape[0]
            points, labels = pts, lab.astype(np.int64)
        elif labels is not None:
            raise PromptError("labels: given without points")
        if boxes is not None:
            bx = _as_array(boxes, "boxes", np.float64)
            if bx.ndim != 2 or bx.shape[1] != 4:
                raise PromptError(f"boxes: expected shape (N, 4) XYXY pixels, got {bx.shape}")
            if not np.isfinite(bx).all():
                raise PromptError("boxes: contain NaN or inf")
            if bx.size and ((bx[:, 2] < bx[:, 0]).any() or (bx[:, 3] < bx[:, 1]).any()):
                raise PromptError("boxes: expected XYXY with x1 >= x0 and y1 >= y0")
            if bx.size and (bx[:, [0, 2]].min() < 0 or bx[:, [1, 3]].min() < 0
                            or bx[:, [0, 2]].max() > W or bx[:, [1, 3]].max() > H):
                raise PromptError(f"boxes: outside the {W}x{H} image")
            if n is not None and bx.shape[0] != n:
                raise PromptError(f"boxes: {bx.shape[0]} boxes for {n} point sets")
            n = bx.shape[0]
            boxes = bx
        if mask_input is not None:
            mi = _as_array(mask_input, "mask_input", np.float32)
            if mi.ndim != 4 or mi.shape[1:] != (1, LOW_RES, LOW_RES):
                raise PromptError(f"mask_input: expected shape (N, 1, {LOW_RES}, {LOW_RES}) logits, got {mi.shape}")
            if not np.isfinite(mi).all():
                raise PromptError("mask_input: contains NaN or inf")
            if n is not None and mi.shape[0] != n:
                raise PromptError(f"mask_input: {mi.shape[0]} masks for {n} prompts")
            n = mi.shape[0]
            mask_input = mi
        if n == 0:
            raise PromptError("prompts: empty prompt set (N = 0)")
        return n, points, labels, boxes, mask_input

    def prompt_tensors(self, emb: ImageEmbedding, points, labels, boxes, mask_input):
        """Validated prompts in the encoder-input frame, as float tensors (see `predict` for shapes)."""
        n, points, labels, boxes, mask_input = self._check_prompts(emb, points, labels, boxes, mask_input)
        (H, W), (h, w) = emb.original_size, emb.input_size
        scale = np.array([w / W, h / H])
        pt = lb = bx = mi = None
        if points is not None:
            pt = torch.as_tensor(points * scale, dtype=torch.float32)
            lb = torch.as_tensor(labels, dtype=torch.int64)
        if boxes is not None:
            bx = torch.as_tensor(boxes * np.tile(scale, 2), dtype=torch.float32)
        if mask_input is not None:
            mi = torch.as_tensor(mask_input, dtype=torch.float32)
        return n, pt, lb, bx, mi

    @torch.no_grad()
    def predict(self, emb: ImageEmbedding, points=None, labels=None, boxes=None, mask_input=None,
                multimask: bool = True, upsample: bool = True) -> Prediction:
        """Masks for N prompts against one embedding.

        points: (N, K, 2) XY pixels of the original image; labels: (N, K) 1/0/-1 (-1 = padding);
        boxes: (N, 4) XYXY pixels; mask_input: (N, 1, 256, 256) logits (a previous low_res_logits).
        Returns masks (N, M, H, W) bool (None if not upsample), iou_pred (N, M), low_res_logits
        (N, M, 256, 256); M = 3 if multimask else 1. Raises PromptError on bad prompts.
        """
        n, pt, lb, bx, mi = self.prompt_tensors(emb, points, labels, boxes, mask_input)
        self.net.eval()
        masks, ious, lows = [], [], []
        for s in range(0, n, PROMPT_CHUNK):
            sl = slice(s, s + PROMPT_CHUNK)
            native, iou = self.decode(emb.features, None if pt is None else pt[sl], None if lb is None else lb[sl],
                                      None if bx is None else bx[sl], None if mi is None else mi[sl], multimask,
                                      extras=emb.extras)
            ious.append(iou)
            low = native.clamp(-32.0, 32.0) if self.net.resize == "squash" else native  # SAM 2 hands these back clamped
            lows.append(low if low.shape[-1] == LOW_RES else
                        F.interpolate(low, (LOW_RES, LOW_RES), mode="bilinear", align_corners=False))
            if upsample:
                masks.append(self._postprocess(native, emb) > 0)
        return Prediction(torch.cat(masks) if upsample else None, torch.cat(ious).cpu(), torch.cat(lows).cpu())

    def decode(self, features: torch.Tensor, points, labels, boxes, mask_input, multimask: bool,
               pe: torch.Tensor | None = None, extras: tuple = ()):
        """Network call (gradients flow if enabled): features (C, h, w) or (P, C, h, w), extras likewise (the
        embedding's); prompts in the input frame. Returns native low-res logits (P, M, 4h, 4w) and IoU
        predictions (P, M). pe: (P, C, h, w) positional encodings of the features' cells, for a window of the
        embedding grid (training on crops); None = the whole grid."""
        n = next(x.shape[0] for x in (points, boxes, mask_input) if x is not None)
        dev = self.device

        def rows(x: torch.Tensor) -> torch.Tensor:  # moved first, then expanded: one copy per image, not per row
            x = x.to(dev)
            return x[None].expand(n, *x.shape) if x.dim() == 3 else x

        feats, extras = rows(features), tuple(rows(e) for e in extras)
        if mask_input is not None:
            side = 4 * feats.shape[-1]
            if mask_input.shape[-1] != side:
                mask_input = F.interpolate(mask_input, (side, side), mode="bilinear", align_corners=False)
            mask_input = mask_input.to(dev)
        decode = self._decoder if not torch.is_grad_enabled() else self.net.decode  # training runs eager
        with self.autocast():
            low, iou = decode(feats, None if points is None else points.to(dev),
                              None if labels is None else labels.to(dev),
                              None if boxes is None else boxes.to(dev), mask_input, multimask,
                              None if pe is None else pe.to(dev), extras)
        return low.float(), iou.float()

    def _postprocess(self, low: torch.Tensor, emb: ImageEmbedding) -> torch.Tensor:
        """(N, M, n, n) logits in the padded input frame -> (N, M, H, W) logits of the original image."""
        if self.net.resize == "squash":  # SAM 2: the S×S frame is the whole image, stretched
            return F.interpolate(low.float(), emb.original_size, mode="bilinear", align_corners=False).cpu()
        S = self.image_size
        h, w = emb.input_size
        x = F.interpolate(low.float(), (S, S), mode="bilinear", align_corners=False)[..., :h, :w]
        return F.interpolate(x, emb.original_size, mode="bilinear", align_corners=False).cpu()

    @torch.no_grad()
    def upsample_logits(self, low_res: torch.Tensor, emb: ImageEmbedding) -> torch.Tensor:
        """low_res: (N, 256, 256) logits (from Prediction.low_res_logits) -> (N, H, W) float logits."""
        low = torch.as_tensor(low_res, dtype=torch.float32).to(self.device)
        if low.dim() != 3 or tuple(low.shape[1:]) != (LOW_RES, LOW_RES):
            raise PromptError(f"low_res: expected shape (N, {LOW_RES}, {LOW_RES}), got {tuple(low.shape)}")
        return self._postprocess(low[:, None], emb)[:, 0]
