"""Image sources: list a local folder or an s3:// prefix, decode any image into (H, W, 3) uint8 RGB.

An image's id is its key relative to the source root ("a/b.jpg"): stable across runs and machines,
unique within the source, and the listing is sorted by it. Decoding applies the EXIF orientation
and turns every mode (grayscale, 16-bit, palette, with alpha, CMYK, …) into 8-bit RGB. Images with
a side above `max_side` are downscaled for the model (`LoadedImage.scale` < 1; masks stay at
`original_size`, the resolution SA-1B stores) or refused, as configured. Files that cannot be
used raise `BadImage` with a one-line reason; `load_many` sets those aside in the quarantine and
goes on.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storage.backend import Store, StoreError, open_store
from storage.quarantine import Quarantine

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
# More pixels than this is treated as a decompression bomb (a small file claiming a huge canvas).
MAX_PIXELS = 120_000_000
# Transparent pixels are shown over this colour (RGB).
ALPHA_BACKGROUND = (255, 255, 255)


class BadImage(Exception):
    """An image that can't be used; str(e) is one line: '<image>: <reason>'."""


@dataclass(frozen=True)
class ImageRef:
    image_id: str  # the key relative to the source root
    key: str
    uri: str  # full local path or s3:// URI


@dataclass
class LoadedImage:
    image_id: str
    pixels: np.ndarray  # (H', W', 3) uint8 RGB, H' = round(H * scale)
    original_size: tuple[int, int]  # (H, W) of the file after EXIF orientation
    scale: float  # pixels side / original side (1.0 unless downscaled)


def image_id_from_key(key: str) -> str:
    """The stable id of an image: its POSIX key relative to the source root."""
    return key.replace("\\", "/").lstrip("/")


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (and 32-bit integer) grey: map the 16-bit range onto 8 bits, values above clip.
        arr = np.asarray(img).astype(np.float64)
        grey = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":  # float grey: no fixed range, stretch min..max
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        grey = np.zeros(arr.shape, np.uint8) if hi <= lo else np.round((arr - lo) / (hi - lo) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB in EXIF orientation. Raises BadImage."""
    if len(data) == 0:
        raise BadImage(f"{name}: empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"{name}: {w}x{h} pixels exceeds the {max_pixels} pixel limit "
                               f"(decompression bomb?)")
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"{name}: decompression bomb ({e})".replace("\n", " ")) from None
        except UnidentifiedImageError:
            raise BadImage(f"{name}: not an image (unrecognised format, {len(data)} bytes)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            # PIL reports truncated/corrupt data with these (e.g. 'image file is truncated').
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadImage(f"{name}: truncated or corrupt image ({reason})") from None


def fit_max_side(pixels: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most `max_side` (area filter). Returns (pixels, scale)."""
    h, w = pixels.shape[:2]
    if max(h, w) <= max_side:
        return pixels, 1.0
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR, reducing_gap=2.0)), scale


class ImageSource:
    """The images under `uri` (a local folder or s3://bucket/prefix), sorted by image id."""

    def __init__(self, uri: str, max_side: int = 1500,
                 large_images: Literal["downscale", "quarantine"] = "downscale",
                 s3_endpoint_url: str | None = None, store: Store | None = None,
                 max_pixels: int = MAX_PIXELS):
        if large_images not in ("downscale", "quarantine"):
            raise ValueError(f"large_images={large_images!r}: expected 'downscale' or 'quarantine'")
        self.uri = uri
        self.store = store or open_store(uri, s3_endpoint_url=s3_endpoint_url)
        self.max_side = int(max_side)
        self.large_images = large_images
        self.max_pixels = max_pixels

    def __repr__(self) -> str:
        return f"ImageSource({self.store.uri!r})"

    def list(self) -> list[ImageRef]:
        """Every file with an image extension, sorted by image id (other files are not images)."""
        refs = [ImageRef(image_id=image_id_from_key(k), key=k, uri=self.store.url(k))
                for k in self.store.list() if k.lower().endswith(IMAGE_EXTENSIONS)]
        return sorted(refs, key=lambda r: r.image_id)

    def ref(self, image_id: str) -> ImageRef:
        """The ref of one image by id (no listing)."""
        return ImageRef(image_id=image_id, key=image_id, uri=self.store.url(image_id))

    def load(self, ref: ImageRef) -> LoadedImage:
        """Read and decode one image; raises BadImage (one line) if it can't be used."""
        try:
            data = self.store.read_bytes(ref.key)
        except StoreError as e:
            raise BadImage(str(e)) from None
        pixels = decode_image(data, ref.uri, self.max_pixels)
        h, w = pixels.shape[:2]
        if max(h, w) > self.max_side and self.large_images == "quarantine":
            raise BadImage(f"{ref.uri}: {w}x{h} is larger than max_side={self.max_side} "
                           f"(images.large_images = quarantine)")
        pixels, scale = fit_max_side(pixels, self.max_side)
        return LoadedImage(image_id=ref.image_id, pixels=pixels, original_size=(h, w), scale=scale)

    def load_many(self, refs: Iterable[ImageRef], quarantine: Quarantine | None,
                  stage: str = "images") -> Iterator[LoadedImage]:
        """Load each image; a bad one goes to the quarantine (if given) and the rest go on."""
        for ref in refs:
            try:
                yield self.load(ref)
            except BadImage as e:
                if quarantine is not None:
                    reason = str(e)
                    reason = reason[len(ref.uri) + 2:] if reason.startswith(f"{ref.uri}: ") else reason
                    quarantine.add(ref.uri, reason, stage)
