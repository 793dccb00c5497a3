"""resize and to_pil_image for numpy/PIL inputs, as segment-anything's ResizeLongestSide uses them."""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_pil_image(image: np.ndarray) -> Image.Image:
    """(H, W, 3) uint8 -> PIL RGB image."""
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a PIL image to size = (h, w) with bilinear filtering (torchvision's PIL path does the same)."""
    h, w = size
    if (image.height, image.width) == (h, w):
        return image
    return image.resize((w, h), Image.BILINEAR)
