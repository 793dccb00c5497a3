"""What the trainer reads: samplers over scenes (in memory, or streamed through a bounded buffer), the input
frame, augmentation and the batch of windows a step trains on (model/train.py)."""
from __future__ import annotations

import weakref
from typing import Callable, Iterable

import numpy as np
import torch
from torch.nn import functional as F

from model.segmenter import PIXEL_MEAN, PIXEL_STD, resized_shape

# A sample: image (H, W, 3) uint8, masks (N, H, W) bool, weights (N,) float.
Sample = tuple[np.ndarray, np.ndarray, np.ndarray]
Sampler = Callable[[np.random.Generator], Sample]


def dataset_sampler(images: list[np.ndarray], masks: list[np.ndarray], weights: list[np.ndarray] | None = None) -> Sampler:
    """Sample uniformly from in-memory data: images (H, W, 3) uint8, masks (N, H, W) bool, weights (N,)."""
    keep = [i for i, m in enumerate(masks) if len(m)]
    if not keep:
        raise ValueError("training data: no image has a mask")
    if weights is None:
        weights = [np.ones(len(m), np.float32) for m in masks]

    def sample(rng: np.random.Generator) -> Sample:
        i = keep[int(rng.integers(len(keep)))]
        return images[i], masks[i], np.asarray(weights[i], np.float32)

    return sample


def to_frame(image: np.ndarray, masks: np.ndarray, side: int, resize: str = "pad") -> tuple[np.ndarray, np.ndarray]:
    """A scene resized to the encoder's input frame (longest side `side`; "squash": side x side, SAM 2's):
    the image antialiased and rounded as `preprocess` does, masks (N, H, W) nearest. Returned as is when
    already there."""
    h, w = (side, side) if resize == "squash" else resized_shape(image.shape[0], image.shape[1], side)
    if (h, w) != image.shape[:2]:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        image = x[0].round().clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    if (h, w) != masks.shape[1:]:
        m = F.interpolate(torch.from_numpy(np.ascontiguousarray(masks)[:, None].astype(np.float32)), (h, w),
                          mode="nearest")
        masks = m[:, 0].numpy() > 0.5
    return image, masks


def input_frame_sampler(data: Sampler, side: int, resize: str = "pad") -> Sampler:
    """`data` with each sample resized once to the encoder's input frame (`to_frame`).

    Resizing a scene cost a sixth of a training step on windows, every time the scene was drawn;
    augmentation (flips, 90° turns, jitter) commutes with it, so it is done once per scene and kept
    while the scene is alive (entries go with the original image, so a streaming sampler does not
    grow the cache). Scenes that the frame enlarges (a small image for a 1024 px ViT) pass through
    as they are: kept enlarged they would cost more memory than the originals.
    """
    cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def sample(rng: np.random.Generator) -> Sample:
        image, masks, weights = data(rng)
        h, w = (side, side) if resize == "squash" else resized_shape(image.shape[0], image.shape[1], side)
        if h * w >= image.shape[0] * image.shape[1]:
            return image, masks, weights
        hit = cache.get(id(image))
        if hit is None or hit[0] is not masks:
            if hit is None:
                weakref.finalize(image, cache.pop, id(image), None)
            hit = cache[id(image)] = (masks, *to_frame(image, masks, side, resize))
        return hit[1], hit[2], weights

    return sample


Scene = tuple  # (key, image (H, W, 3) uint8, masks (N, H, W) bool, weights (N,) float32)


def buffered_sampler(scenes: Callable[[], "Iterable[Scene]"], buffer_images: int, refresh_every: int = 4) -> Sampler:
    """Sample from a stream of scenes while holding at most `buffer_images` of them in memory.

    scenes: called once per pass over the data; yields (key, image, masks, weights) in a fixed order (the shard
    store's: storage.datasets). The first call fills the buffer. When the whole pass fits, its scenes are kept
    for good, fragments with the same key (an image's masks from several shards) merged and sorted by key, and
    sampling is uniform over them — exactly the in-memory sampler (`dataset_sampler`). When it does not fit,
    every `refresh_every` samples the next scene of the stream (passes repeat) replaces a random one of the
    buffer: memory is bounded by `buffer_images`, not by the data set.
    """
    if buffer_images < 1:
        raise ValueError(f"buffer_images: must be >= 1, got {buffer_images}")
    state: dict = {"buffer": None, "stream": None, "draws": 0}

    def next_scene():
        for _ in range(2):  # the end of a pass: start the next one
            if state["stream"] is None:
                state["stream"] = iter(scenes())
            for scene in state["stream"]:
                if len(scene[2]):
                    return scene
            state["stream"] = None
        return None

    def fill(rng: np.random.Generator) -> None:
        state["stream"] = iter(scenes())
        first: list = []
        for scene in state["stream"]:
            if len(scene[2]):
                first.append(scene)
            if len(first) >= buffer_images:
                break
        else:  # the whole pass fits: keep it, as the in-memory sampler does
            merged: dict = {}
            for key, image, masks, weights in first:
                if key in merged:
                    _, m, w = merged[key]
                    merged[key] = (image, np.concatenate([m, masks]), np.concatenate([w, weights]))
                else:
                    merged[key] = (image, masks, np.asarray(weights, np.float32))
            state["buffer"] = [merged[k] for k in sorted(merged)]
            state["stream"] = False  # nothing more to stream
            if not state["buffer"]:
                raise ValueError("training data: no image has a mask")
            return
        state["buffer"] = [(image, masks, np.asarray(w, np.float32)) for _, image, masks, w in first]

    def sample(rng: np.random.Generator) -> Sample:
        if state["buffer"] is None:
            fill(rng)
        buffer = state["buffer"]
        if state["stream"] is not False:
            state["draws"] += 1
            if state["draws"] % refresh_every == 0:
                scene = next_scene()
                if scene is not None:
                    _, image, masks, weights = scene
                    buffer[int(rng.integers(len(buffer)))] = (image, masks, np.asarray(weights, np.float32))
        return buffer[int(rng.integers(len(buffer)))]

    return sample


def _flip_turn(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random 90° rotation and horizontal flip of image (H, W, 3) and masks (N, H, W), as views."""
    k = int(rng.integers(4))
    image, masks = np.rot90(image, k, (0, 1)), np.rot90(masks, k, (1, 2))
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    return image, masks


def _jitter(rng: np.random.Generator) -> tuple[float, float]:
    """Brightness/contrast jitter: pixels -> clip(pixels * gain + bias, 0, 255)."""
    return float(rng.uniform(0.75, 1.25)), float(rng.uniform(-25, 25))


def augment(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flips, 90° rotations and brightness/contrast jitter, applied alike to image and masks."""
    image, masks = _flip_turn(image, masks, rng)
    gain, bias = _jitter(rng)
    image = np.clip(image.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(masks)


_MEAN = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
_STD = torch.tensor(PIXEL_STD).view(3, 1, 1)


def _window(image: np.ndarray, masks: np.ndarray, ox: int, oy: int, size: int, gain: float, bias: float):
    """The size x size window at (ox, oy) of the zero-padded input frame: pixels (3, size, size)
    jittered and normalised as `preprocess` does (0 outside the image), masks (N, size, size) bool.
    image (h, w, 3) uint8 and masks (N, h, w) in the input frame, views allowed: only the window
    is copied."""
    img = image[oy:oy + size, ox:ox + size]
    ph, pw = img.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    x = (x * gain + bias).clamp_(0, 255).trunc_()  # as the uint8 jitter of `augment`
    pixels = torch.zeros((3, size, size))
    pixels[:, :ph, :pw] = (x - _MEAN) / _STD
    m = np.zeros((len(masks), size, size), bool)
    m[:, :ph, :pw] = masks[:, oy:oy + size, ox:ox + size]
    return pixels, torch.from_numpy(m)


def _batch(samplers: Sampler, rng: np.random.Generator, s: "TrainSettings", side: int, crop: int | None = None,
           stride: int = 8, resize: str = "pad"):
    """B images -> pixels (B, 3, F, F), gt (P, F, F) bool, weights (P,), image index (P,), window
    offsets (B, 2) XY input px. F = side, or `crop` for windows at offsets that are multiples of
    `stride` (the embedding's cell size in input px). Only each window is copied and normalised."""
    pixels, gts, ws, owner, offsets = [], [], [], [], []
    size = crop or side
    while len(pixels) < (s.crop_batch_images if crop else s.batch_images):
        image, masks, weights = samplers(rng)
        image, masks = to_frame(image, masks, side, resize)  # a no-op for scenes from `input_frame_sampler`
        image, masks = _flip_turn(image, masks, rng)
        gain, bias = _jitter(rng)
        ox = oy = 0
        if crop:
            ox, oy = (int(v) * stride for v in rng.integers(0, (side - crop) // stride + 1, 2))
        px, m = _window(image, masks, ox, oy, size, gain, bias)
        ok = np.nonzero(m.sum((1, 2)).numpy() >= s.min_area)[0]
        if len(ok) == 0:
            continue
        pick = rng.choice(ok, size=min(s.masks_per_image, len(ok)), replace=False)
        gts.append(m[pick])
        ws.append(torch.as_tensor(weights[pick], dtype=torch.float32))
        owner.extend([len(pixels)] * len(pick))
        pixels.append(px)
        offsets.append((ox, oy))
    return torch.stack(pixels), torch.cat(gts), torch.cat(ws), torch.as_tensor(owner), torch.as_tensor(offsets)
