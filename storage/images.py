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

import errno
import io
import math
import os
import stat
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storage.backend import Store, StoreError, open_store
from storage.quarantine import Quarantine

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
# More pixels than this is treated as a decompression bomb (a small file claiming a huge canvas). PIL's own
# guard (Image.MAX_IMAGE_PIXELS, 89.5 Mpx, an error at twice that) is replaced by this one limit.
MAX_PIXELS = 120_000_000
# Seconds one image may take to read (a FIFO, a hung NFS mount or a stalled S3 read must not stop a run).
LOAD_TIMEOUT_S = 120.0
# High bit depth (16-bit, 32-bit integer or float grey; 16-bit colour) -> 8 bits: "percentile" stretches the image's own
# 0.5th..99.5th percentile onto 0..255 (a 12-bit microscopy TIFF in a 16-bit container stays visible);
# "range" divides by the container's range (16-bit / 257; float: min..max).
HIGH_BIT_DEPTH = ("percentile", "range")
PERCENTILES = (0.5, 99.5)
# Our own check (`max_pixels`, per source, before any pixel is decoded) replaces PIL's global one, which
# called a 110 Mpx photo a bomb although the documented limit is 120 Mpx.
Image.MAX_IMAGE_PIXELS = None
# Transparent pixels are shown over this colour (RGB).
ALPHA_BACKGROUND = (255, 255, 255)


class BadImage(Exception):
    """An image that can't be used; str(e) is one line: '<image>: <reason>'. transient: trying again
    later may work (missing, unreadable, half-written, slow), as opposed to a file that is not a usable
    image at all; storage/quarantine.py retries the former."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    @property
    def kind(self) -> str:
        return "transient" if self.transient else "permanent"


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


def match_file_names(file_names: Iterable[str], image_ids: Iterable[str]) -> dict[str, str]:
    """Ground-truth file names -> the image ids they name. The rule: the same id (after `image_id_from_key`);
    else the one image id that ends with the name's path, or that the name's path ends with, at a folder
    boundary — "JPEGImages/x.jpg" (labelme, many COCO exports) names "x.jpg" of a source pointed at
    JPEGImages/, and "x.jpg" names "train/x.jpg". A name that fits no id, or more than one, is left out."""
    ids = list(dict.fromkeys(image_ids))
    exact = set(ids)
    by_base: dict[str, list[str]] = {}
    for i in ids:
        by_base.setdefault(i.rsplit("/", 1)[-1], []).append(i)
    out = {}
    for name in file_names:
        key = image_id_from_key(name)
        if key in exact:
            out[name] = key
            continue
        fits = [i for i in by_base.get(key.rsplit("/", 1)[-1], [])
                if i.endswith("/" + key) or key.endswith("/" + i)]
        if len(fits) == 1:
            out[name] = fits[0]
    return out


def _stretch(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values lo..hi -> 0..255 uint8 (clipped; NaN -> 0; a flat image -> 0)."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip(np.round((arr - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _high_bit_depth_grey(img: Image.Image, mapping: str) -> np.ndarray:
    """16-bit, 32-bit integer or float grey -> (H, W) uint8 by `mapping` (see HIGH_BIT_DEPTH)."""
    arr = np.asarray(img).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape, np.uint8)
    if mapping == "percentile":
        lo, hi = np.percentile(finite, PERCENTILES)
        if hi <= lo:  # mostly flat: fall back to the full min..max
            lo, hi = finite.min(), finite.max()
        return _stretch(arr, lo, hi)
    if img.mode == "F":
        return _stretch(arr, finite.min(), finite.max())
    return _stretch(arr, 0.0, 65535.0)  # the 16-bit container's range (32-bit values above it clip)


def _rawmode(img: Image.Image) -> str:
    """How the file stores its pixels (PIL's raw mode, e.g. 'RGB;16B'), '' when PIL does not say."""
    if not img.tile:
        return ""
    args = img.tile[0].args
    return args if isinstance(args, str) else str(args[0]) if args else ""


_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _high_bit_depth_colour(data: bytes, img: Image.Image, mapping: str) -> np.ndarray | None:
    """A 16-bit-per-channel colour file (TIFF, PNG) -> (H, W, 3) uint8 by `mapping` over all channels together
    (hues kept), in EXIF orientation; None when OpenCV can't read it either. PIL reads such files as 8-bit RGB
    by keeping the high byte, which turns 12-bit data in a 16-bit container into values 0..15."""
    import cv2  # the one decoder here that keeps 16-bit colour

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint16:
        return None
    rgb = arr[..., 2::-1].astype(np.float64)  # BGR(A) -> RGB
    if arr.shape[2] == 4:  # over the background colour, as 8-bit transparency is shown
        alpha = arr[..., 3:4].astype(np.float64) / 65535.0
        rgb = rgb * alpha + np.array(ALPHA_BACKGROUND, np.float64) * 257.0 * (1.0 - alpha)
    if mapping == "percentile":
        lo, hi = np.percentile(rgb, PERCENTILES)
        if hi <= lo:
            lo, hi = rgb.min(), rgb.max()
        out = _stretch(rgb, lo, hi)
    else:
        out = _stretch(rgb, 0.0, 65535.0)
    turn = _EXIF_TRANSPOSE.get(img.getexif().get(0x0112, 1))
    return np.asarray(Image.fromarray(out).transpose(turn)) if turn is not None else out


def _to_rgb(img: Image.Image, high_bit_depth: str = "percentile") -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = _high_bit_depth_grey(img, high_bit_depth)
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


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS,
                 high_bit_depth: str = "percentile") -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB in EXIF orientation. Raises BadImage.

    The one decoder of the engine: stages, evaluation, training, the ML backend and the exports all
    see the same pixels for the same file. Empty and truncated files are transient (a copy in progress)."""
    return decode_image_sized(data, name, max_pixels, high_bit_depth)[0]


def decode_image_sized(data: bytes, name: str, max_pixels: int = MAX_PIXELS, high_bit_depth: str = "percentile",
                       draft_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_image`, and the (H, W) of the file after EXIF orientation. draft_side: a JPEG at least twice
    that on its longer side is decoded at a reduced size (1/2, 1/4 or 1/8, the largest reduction that keeps
    the longer side >= draft_side: the JPEG decoder's own DCT scaling), so a 100-megapixel photo bound for a
    1500 px model never exists at full size in memory."""
    if high_bit_depth not in HIGH_BIT_DEPTH:
        raise ValueError(f"high_bit_depth={high_bit_depth!r}: expected one of {HIGH_BIT_DEPTH}")
    if len(data) == 0:
        raise BadImage(f"{name}: empty file (0 bytes)", transient=True)
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise BadImage(f"{name}: {w}x{h} pixels exceeds the {max_pixels} pixel limit "
                           f"(decompression bomb?)")
        if w == 0 or h == 0:
            raise BadImage(f"{name}: {w}x{h} image has no pixels")
        # first: loading (which getexif() may do, for a PNG) forgets the raw mode
        deep_colour = img.mode in ("RGB", "RGBA") and ";16" in _rawmode(img)
        size = (w, h) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)  # rotations swap the sides
        if draft_side and img.format == "JPEG" and max(w, h) >= 2 * draft_side:
            f = draft_side / max(w, h)
            img.draft(img.mode, (math.ceil(w * f), math.ceil(h * f)))
        img.load()
        if deep_colour:
            colour = _high_bit_depth_colour(data, img, high_bit_depth)
            if colour is not None:
                return colour, size
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img, high_bit_depth), size
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"{name}: decompression bomb ({e})".replace("\n", " ")) from None
    except UnidentifiedImageError:
        raise BadImage(f"{name}: not an image (unrecognised format, {len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        # PIL reports truncated/corrupt data with these (e.g. 'image file is truncated').
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImage(f"{name}: truncated or corrupt image ({reason})", transient=True) from None


def image_size(source: "ImageSource", image_id: str) -> tuple[int, int] | None:
    """(H, W) of an image file after EXIF orientation, from its header alone; None when it can't be read."""
    try:
        with Image.open(io.BytesIO(source.read(source.ref(image_id)))) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the sides
                w, h = h, w
            return h, w
    except (BadImage, OSError, ValueError, SyntaxError):
        return None


def fit_max_side(pixels: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most `max_side` (area filter). Returns (pixels, scale).
    A thin image keeps at least 1 pixel across (3x20000 -> 1x1500, not 0x1500)."""
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
                 max_pixels: int = MAX_PIXELS, high_bit_depth: str = "percentile",
                 load_timeout_s: float = LOAD_TIMEOUT_S):
        if large_images not in ("downscale", "quarantine"):
            raise ValueError(f"large_images={large_images!r}: expected 'downscale' or 'quarantine'")
        if high_bit_depth not in HIGH_BIT_DEPTH:
            raise ValueError(f"high_bit_depth={high_bit_depth!r}: expected one of {HIGH_BIT_DEPTH}")
        self.uri = uri
        self.store = store or open_store(uri, s3_endpoint_url=s3_endpoint_url)
        self.max_side = int(max_side)
        self.large_images = large_images
        self.max_pixels = max_pixels
        self.high_bit_depth = high_bit_depth
        self.load_timeout_s = float(load_timeout_s)

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

    def read(self, ref: ImageRef) -> bytes:
        """The file's bytes within `load_timeout_s`; raises BadImage (transient) when it is missing,
        unreadable or too slow, and (permanent) when it is not a regular file (a FIFO, a device)."""
        path = getattr(self.store, "root", None)
        if path is not None:  # local: a FIFO or device named *.png would block the read forever
            try:
                st = os.stat(self.store.url(ref.key))
            except OSError as e:
                if e.errno == errno.ELOOP:  # will loop again on every retry
                    raise BadImage(f"{ref.uri}: a symbolic link loop") from None
                if isinstance(e, FileNotFoundError) and os.path.islink(self.store.url(ref.key)):
                    raise BadImage(f"{ref.uri}: a dangling symbolic link (its target "
                                   f"{os.readlink(self.store.url(ref.key))!r} does not exist)") from None
                why = "not found" if isinstance(e, FileNotFoundError) else f"cannot read ({e.strerror or e})"
                raise BadImage(f"{ref.uri}: {why}", transient=True) from None
            if not stat.S_ISREG(st.st_mode):
                raise BadImage(f"{ref.uri}: not a regular file (a FIFO, socket or device)")
        result: dict = {}

        def read() -> None:
            try:
                result["data"] = self.store.read_bytes(ref.key)
            except BaseException as e:  # handed to the caller's thread
                result["error"] = e

        reader = threading.Thread(target=read, name="image-read", daemon=True)
        reader.start()
        reader.join(self.load_timeout_s)
        if reader.is_alive():  # the thread is left behind (a blocked read can't be interrupted)
            raise BadImage(f"{ref.uri}: not read within {self.load_timeout_s:g} s (images.load_timeout_s)",
                           transient=True)
        if "error" in result:
            e = result["error"]
            if isinstance(e, StoreError):
                raise BadImage(str(e), transient=True) from None
            raise e
        return result["data"]

    def load(self, ref: ImageRef) -> LoadedImage:
        """Read and decode one image; raises BadImage (one line) if it can't be used."""
        data = self.read(ref)
        draft = self.max_side if self.large_images == "downscale" else None
        pixels, (h, w) = decode_image_sized(data, ref.uri, self.max_pixels, self.high_bit_depth, draft)
        if max(h, w) > self.max_side and self.large_images == "quarantine":
            raise BadImage(f"{ref.uri}: {w}x{h} is larger than max_side={self.max_side} "
                           f"(images.large_images = quarantine)")
        pixels, _ = fit_max_side(pixels, self.max_side)
        scale = max(pixels.shape[:2]) / max(h, w)
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
                    quarantine.add(ref.uri, reason, stage, e.kind)
