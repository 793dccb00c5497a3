"""The embedded synthetic data set: scenes with exact instance ground truth.

A stand-in for real photos that runs offline: a textured background with 2–12 objects of varied
shape (ellipses, rectangles, polygons, rings, blobs) and size, textured fills, pixel noise, and
occlusion (objects are painted in z-order; every ground-truth mask is the *visible* part). About a
third of the objects are made of 2–3 differently textured parts, so a click on one part is
ambiguous (part or whole object?), as in SAM: the ground truth holds the whole object and each
part, the part pointing at its object through `parents` / the COCO field `parent_id`.

Everything painted is labelled: an object that would hide too much of an earlier one is not
placed, so no painted region is left without a mask.

Scene `i` of seed `s` depends on (s, i) only, so data sets of different sizes share a prefix and a
hold-out split is simply another seed (file names carry the seed, so splits never collide).

Two families of scenes (`FAMILIES`), so a run can need adaptation as SAM's did (it started from a model
trained on public data and annotated other photos): "shapes" — few, mostly large, vividly coloured objects
on a soft background (the bootstrap family); "pebbles" — a cluttered tray of many small, dull, similar
objects with rough textures and grain on a busy background, often touching (what the demo annotates). A
model trained on shapes alone scores far lower on pebbles than on shapes (docs/experiments/flywheel.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from storage.coco import CocoImage, rle_annotation, write_coco

SHAPES = ("ellipse", "rectangle", "polygon", "ring", "blob")
TEXTURES = ("flat", "stripes", "checker", "noise", "gradient")

MIN_OBJECTS, MAX_OBJECTS = 2, 12
PART_PROBABILITY = 0.35  # share of objects built from 2–3 parts
MIN_VISIBLE_FRACTION = 0.35  # a later object may hide at most 65% of an earlier segment
PLACEMENT_TRIES = 6


@dataclass(frozen=True)
class SceneFamily:
    """What a family of scenes looks like. Sizes are shares of the image side; colours 0..255."""

    objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)  # objects per scene, inclusive
    radius: tuple[float, float] = (0.05, 0.3)  # object radius, log-uniform
    shapes: tuple[str, ...] = SHAPES
    shape_weights: tuple[float, ...] | None = None  # None: uniform
    textures: tuple[str, ...] = TEXTURES
    colour: tuple[float, float] = (20, 235)  # object colours uniform in this range per channel
    dull: float = 0.0  # 0: free colours; 1: every object is a grey/brown shade near the background's
    amplitude: tuple[float, float] = (12, 40)  # texture contrast inside an object
    background_grain: tuple[float, float] = (8, 24)
    noise: tuple[float, float] = (3, 9)  # pixel noise sigma
    part_probability: float = PART_PROBABILITY


FAMILIES = {
    "shapes": SceneFamily(),
    "pebbles": SceneFamily(objects=(8, 16), radius=(0.05, 0.14), shapes=("blob", "ellipse", "polygon", "rectangle"),
                           shape_weights=(0.5, 0.3, 0.1, 0.1), textures=("noise", "stripes", "flat"),
                           dull=0.75, amplitude=(20, 45), background_grain=(25, 45), noise=(8, 14),
                           part_probability=0.25),
}


def scene_family(name: str) -> SceneFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"synth: unknown scene family {name!r} (known: {', '.join(FAMILIES)})") from None


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a (cells x cells) random grid upsampled bilinearly to (h, w)."""
    cells = max(2, cells)
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, h: int, w: int, color: np.ndarray, size: int,
             family: SceneFamily = FAMILIES["shapes"]) -> np.ndarray:
    """A textured fill (h, w, 3) float32 in 0..255 around `color` (3,) RGB."""
    kind = family.textures[rng.integers(len(family.textures))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "flat":
        pattern = np.zeros((h, w), np.float32)
    elif kind == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.02, 0.08) * size
        pattern = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
    elif kind == "checker":
        cell = max(2.0, rng.uniform(0.015, 0.05) * size)
        pattern = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) * 2 - 1
    elif kind == "noise":
        pattern = _smooth_noise(rng, h, w, int(rng.integers(4, 16))) * 2 - 1
    else:  # gradient: like a light falling across the object
        theta = rng.uniform(0, 2 * np.pi)
        ramp = xx * np.cos(theta) + yy * np.sin(theta)
        pattern = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0) * 2 - 1
    amplitude = rng.uniform(*family.amplitude)
    tint = rng.uniform(0.6, 1.0, size=3)  # the pattern is not pure grey
    return color[None, None, :] + amplitude * pattern[..., None] * tint[None, None, :]


def _background(rng: np.random.Generator, size: int, family: SceneFamily = FAMILIES["shapes"]) -> np.ndarray:
    """A textured background (size, size, 3) float32: two colours blended by smooth noise, plus grain."""
    a, b = rng.uniform(30, 225, size=3), rng.uniform(30, 225, size=3)
    blend = _smooth_noise(rng, size, size, int(rng.integers(3, 8)))[..., None]
    grain = _smooth_noise(rng, size, size, max(8, size // 6))[..., None] * 2 - 1
    return (a * blend + b * (1 - blend) + rng.uniform(*family.background_grain) * grain).astype(np.float32)


def _object_colour(rng: np.random.Generator, family: SceneFamily, palette: np.ndarray | None) -> np.ndarray:
    """An object's base colour (3,): free in the family's range, or pulled towards the scene's dull palette."""
    colour = rng.uniform(*family.colour, size=3)
    if palette is None:
        return colour
    return (1 - family.dull) * colour + family.dull * (palette + rng.normal(0, 30, size=3))


def _shape_mask(rng: np.random.Generator, size: int, family: SceneFamily = FAMILIES["shapes"]) -> np.ndarray | None:
    """One random shape as a (size, size) bool mask, or None if it fell outside the image."""
    if family.shape_weights is None:
        kind = family.shapes[rng.integers(len(family.shapes))]
    else:
        weights = np.asarray(family.shape_weights, np.float64)
        kind = family.shapes[rng.choice(len(family.shapes), p=weights / weights.sum())]
    # Log-uniform radius: many small objects, some large ones (as in real photos).
    lo, hi = family.radius
    r = float(np.exp(rng.uniform(np.log(lo * size), np.log(hi * size))))
    cx, cy = rng.uniform(-0.1, 1.1) * size, rng.uniform(-0.1, 1.1) * size
    if kind == "polygon":
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.5, 1.0, n)
        pts = [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).polygon(pts, fill=1)
        mask = np.asarray(canvas, dtype=bool)
        return mask if mask.any() else None
    # The others are computed inside their bounding window only (fast at 1500 px).
    x0, x1 = int(max(0, np.floor(cx - r))), int(min(size, np.ceil(cx + r) + 1))
    y0, y1 = int(max(0, np.floor(cy - r))), int(min(size, np.ceil(cy + r) + 1))
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    theta = rng.uniform(0, np.pi)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    aspect = rng.uniform(0.4, 1.0)
    if kind == "ellipse":
        local = (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
    elif kind == "rectangle":
        local = (np.abs(u) <= r * 0.9) & (np.abs(v) <= r * 0.9 * aspect)
    elif kind == "ring":
        e = (u / r) ** 2 + (v / (r * aspect)) ** 2
        local = (e <= 1) & (e >= rng.uniform(0.2, 0.5))
    else:  # blob: a radius that wobbles with the angle
        phi = np.arctan2(dy, dx)
        wobble = np.ones_like(phi)
        for k in range(2, 6):
            wobble += rng.uniform(0, 0.25 / k * 2) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        local = np.hypot(dx, dy) <= r * 0.8 * wobble
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = local
    return mask if mask.any() else None


def _split_into_parts(rng: np.random.Generator, shape: np.ndarray, size: int) -> list[np.ndarray]:
    """Split an object into 2–3 parts: cut across its main axis, or attach a second shape to it."""
    ys, xs = np.nonzero(shape)
    n_parts = int(rng.integers(2, 4))
    if rng.random() < 0.6:
        # Bands across a random direction, cut at quantiles so every part gets a fair share.
        theta = rng.uniform(0, np.pi)
        proj = xs * np.cos(theta) + ys * np.sin(theta)
        cuts = np.quantile(proj, np.sort(rng.uniform(0.25, 0.75, n_parts - 1)))
        band = np.searchsorted(cuts, proj)
        parts = []
        for k in range(n_parts):
            part = np.zeros_like(shape)
            part[ys[band == k], xs[band == k]] = True
            parts.append(part)
        return parts
    # A body with appendages: small shapes centred on the body's boundary region.
    parts, body = [shape], shape.copy()
    for _ in range(n_parts - 1):
        i = int(rng.integers(len(ys)))
        r = max(3.0, np.sqrt(len(ys) / np.pi) * rng.uniform(0.3, 0.6))
        yy, xx = np.ogrid[0:size, 0:size]
        cy, cx = ys[i] + rng.normal(0, r * 0.5), xs[i] + rng.normal(0, r * 0.5)
        appendage = ((xx - cx) / r) ** 2 + ((yy - cy) / (r * rng.uniform(0.5, 1.0))) ** 2 <= 1
        appendage &= ~body
        if appendage.any():
            parts.append(appendage)
            body |= appendage
    return parts


def make_scene(rng: np.random.Generator, size: int = 256, family: str = "shapes"
               ) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
    """One synthetic scene of `family` (see FAMILIES).

    Returns image (size, size, 3) uint8 RGB; masks (N, size, size) bool, the visible part of every
    object and of every part; parents: N entries, None for an object, else the index (into masks)
    of the object a part belongs to. Objects come in z-order (back to front), each followed by
    its parts.
    """
    fam = scene_family(family)
    image = _background(rng, size, fam)
    # A dull family's objects share one earthy palette near the background's mean colour.
    palette = None
    if fam.dull > 0:
        palette = image.reshape(-1, 3).mean(axis=0) * 0.5 + rng.uniform(60, 170) * np.array([1.0, 0.9, 0.75]) * 0.5
    owner = np.full((size, size), -1, np.int32)  # which leaf segment (part or whole object) shows
    leaf_full_area: list[int] = []  # each leaf's area when it was painted
    objects: list[list[int]] = []  # leaf ids of each placed object
    min_area = max(20, int(0.0008 * size * size))
    n_target = int(rng.integers(fam.objects[0], fam.objects[1] + 1))
    attempts = 0
    # Keep trying past the budget until the minimum is met (a free spot always exists early on).
    while (len(objects) < n_target and attempts < n_target * PLACEMENT_TRIES) or (
            len(objects) < MIN_OBJECTS and attempts < 1000):
        attempts += 1
        shape = _shape_mask(rng, size, fam)
        if shape is None or shape.sum() < min_area * 2:
            continue
        leaves = [shape]
        if rng.random() < fam.part_probability:
            parts = _split_into_parts(rng, shape, size)
            if len(parts) >= 2 and all(p.sum() >= min_area for p in parts):
                leaves = parts  # else: a part too small to click on; keep the object whole
        union = np.logical_or.reduce(leaves)
        # Refuse a placement that would hide too much of what is already there.
        hidden = np.bincount(owner[union & (owner >= 0)], minlength=len(leaf_full_area))
        if len(leaf_full_area):
            visible = np.bincount(owner[owner >= 0], minlength=len(leaf_full_area)) - hidden
            too_hidden = (visible < MIN_VISIBLE_FRACTION * np.array(leaf_full_area)) | (visible < min_area)
            if np.any(too_hidden & (hidden > 0)):
                continue
        colors: list[np.ndarray] = []
        ids = []
        for leaf in leaves:
            color = _object_colour(rng, fam, palette)
            for _ in range(10):  # parts of one object should differ visibly from each other
                if all(np.linalg.norm(color - c) > 70 for c in colors):
                    break
                color = _object_colour(rng, fam, palette)
            colors.append(color)
            ys, xs = np.nonzero(leaf)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            tex = _texture(rng, int(y1 - y0), int(x1 - x0), color, size, fam)
            window = leaf[y0:y1, x0:x1]
            image[y0:y1, x0:x1][window] = tex[window]
            leaf_id = len(leaf_full_area)
            owner[leaf] = leaf_id
            leaf_full_area.append(int(leaf.sum()))
            ids.append(leaf_id)
        objects.append(ids)

    image += rng.normal(0, rng.uniform(*fam.noise), size=image.shape).astype(np.float32)
    image_u8 = np.clip(image, 0, 255).astype(np.uint8)

    masks: list[np.ndarray] = []
    parents: list[int | None] = []
    for ids in objects:
        leaf_masks = [owner == i for i in ids]
        masks.append(np.logical_or.reduce(leaf_masks))
        parents.append(None)
        if len(ids) > 1:
            whole = len(masks) - 1
            for m in leaf_masks:
                masks.append(m)
                parents.append(whole)
    stacked = np.stack(masks) if masks else np.zeros((0, size, size), bool)
    return image_u8, stacked, parents


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for scene `index` of split `seed` (independent of the data set's size)."""
    return np.random.default_rng([int(seed), int(index)])


def image_file_name(seed: int, index: int, family: str = "shapes") -> str:
    return f"synth-s{seed}-{index:05d}.png" if family == "shapes" else f"synth-{family}-s{seed}-{index:05d}.png"


def write_synthetic_dataset(out: str | os.PathLike, n_images: int, seed: int, size: int = 256,
                            family: str = "shapes") -> dict:
    """Write `out/images/*.png` and `out/annotations.json` (COCO; RLE counts as str; `parent_id`), scenes of
    `family` (FAMILIES).

    Re-running with the same arguments rewrites identical files; annotations.json is written last
    and atomically, so a half-written data set is never taken for a finished one.
    Returns a summary: out, images, objects, parts, annotations, seed, size, family.
    """
    scene_family(family)  # an unknown family fails before anything is written
    if n_images < 0:
        raise ValueError(f"synth: --images must be >= 0, got {n_images}")
    if size < 32:
        raise ValueError(f"synth: --size must be >= 32 pixels, got {size}")
    out = Path(out)
    image_dir = out / "images"
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{image_dir}: cannot create output folder ({e.strerror})") from None

    coco_images: list[CocoImage] = []
    n_objects = n_parts = n_annotations = 0
    for i in range(n_images):
        image, masks, parents = make_scene(scene_rng(seed, i), size, family)
        name = image_file_name(seed, i, family)
        tmp = image_dir / f".{name}.tmp"
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, image_dir / name)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        first = n_annotations + 1
        anns = [rle_annotation(first + k, i + 1, rle, parent_id=None if parent is None else first + parent)
                for k, (rle, parent) in enumerate(zip(rles, parents))]
        coco_images.append(CocoImage(i + 1, name, size, size, anns))
        n_annotations += len(anns)
        n_objects += sum(p is None for p in parents)
        n_parts += sum(p is not None for p in parents)
    write_coco(out / "annotations.json", coco_images,
               info={"description": "sa-engine synthetic scenes", "seed": seed, "size": size, "family": family,
                     "generator": "engine.integrations.synth.make_scene"})
    return {"out": str(out), "images": n_images, "objects": n_objects, "parts": n_parts,
            "annotations": n_annotations, "seed": seed, "size": size, "family": family}


def synthetic_sampler(size: int = 256, pool: int = 512, fresh_prob: float = 0.25, family: str = "shapes"):
    """A model.train Sampler of synthetic scenes from the training generator: unlimited data.

    Making a scene costs about as much as a quarter of a training step on a CPU, so a pool of up
    to `pool` scenes is kept and a new one is made with probability `fresh_prob` (or while the pool
    fills); augmentation makes the reused ones differ.
    """
    scenes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def sample(rng: np.random.Generator):
        if len(scenes) < min(pool, 64) or rng.random() < fresh_prob:
            image, masks, _ = make_scene(rng, size, family)
            item = (image, masks, np.ones(len(masks), np.float32))
            if len(scenes) < pool:
                scenes.append(item)
            else:
                scenes[int(rng.integers(pool))] = item
            return item
        return scenes[int(rng.integers(len(scenes)))]

    return sample
