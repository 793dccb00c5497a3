"""Our brush RLE codec is bit-identical to label_studio_sdk.converter.brush (the reference)."""
from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush as sdk

from storage.brush_rle import (BrushRLEError, decode_alpha, decode_mask, decode_values, encode_values,
                               mask_to_rle)


def _shapes(h: int, w: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ellipse = ((yy - cy) / max(h / 3, 1)) ** 2 + ((xx - cx) / max(w / 4, 1)) ** 2 < 1
    noise = rng.random((h, w)) < 0.3
    stripes = (xx // 3 + yy) % 2 == 0  # runs of 1..3 pixels: every short-run code
    return [ellipse, noise, stripes, np.zeros((h, w), bool), np.ones((h, w), bool), ellipse ^ noise]


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (5, 3), (31, 47), (120, 90), (300, 301)])
def test_masks_match_sdk(h, w):
    for i, mask in enumerate(_shapes(h, w, seed=h * 1000 + w)):
        reference = sdk.mask2rle(mask.astype(np.uint8) * 255)
        ours = mask_to_rle(mask)
        assert ours == reference, f"shape {i} at {h}x{w}"
        sdk_alpha = sdk.decode_rle(reference).reshape(h, w, 4)[:, :, 3]
        assert np.array_equal(decode_alpha(reference, h, w), sdk_alpha)
        assert np.array_equal(decode_mask(ours, h, w), mask)
        assert np.array_equal(decode_values(reference), sdk.decode_rle(reference))


def test_long_runs_split_like_sdk():
    # 300 x 300 x 4 = 360000 equal values: five 65536-long pieces and a rest, like the SDK.
    for mask in (np.ones((300, 300), bool), np.pad(np.ones((200, 300), bool), ((100, 0), (0, 0)))):
        assert mask_to_rle(mask) == sdk.mask2rle(mask.astype(np.uint8) * 255)


def test_uint8_masks_and_raw_values_match_sdk():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 4, (40, 50)).astype(np.uint8) * 60
    assert mask_to_rle(gray) == sdk.mask2rle(gray)
    # Raw value streams have runs of length 1 (one-word literal blocks) and lengths of all widths.
    values = np.repeat(rng.integers(0, 256, 400).astype(np.uint8), rng.integers(1, 300, 400))
    reference = sdk.encode_rle(values)
    assert encode_values(values).tolist() == reference
    assert np.array_equal(decode_values(reference), sdk.decode_rle(reference))


class _BitWriter:
    """Writes the general format (any word size, rle_sizes, multi-word literal blocks)."""

    def __init__(self, num: int, word_size: int, rle_sizes: tuple[int, int, int, int]):
        self.bits = f"{num:032b}{word_size - 1:05b}" + "".join(f"{s - 1:04b}" for s in rle_sizes)
        self.word_size, self.rle_sizes = word_size, rle_sizes

    def block(self, run: bool, size_index: int, values: list[int]) -> None:
        n = len(values) if not run else values[1]
        self.bits += ("1" if run else "0") + f"{size_index:02b}" + \
            format(n - 1, f"0{self.rle_sizes[size_index]}b")
        words = [values[0]] if run else values
        self.bits += "".join(format(v, f"0{self.word_size}b") for v in words)

    def to_list(self) -> list[int]:
        bits = self.bits + "0" * (-len(self.bits) % 8)
        return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def test_general_streams_decode_like_sdk():
    rng = np.random.default_rng(7)
    for word_size, rle_sizes in [(8, (3, 4, 8, 16)), (8, (2, 5, 7, 12)), (5, (1, 3, 6, 9))]:
        blocks, num = [], 0
        for _ in range(200):
            idx = int(rng.integers(0, 4))
            n = int(rng.integers(1, min(2 ** rle_sizes[idx], 40) + 1))
            run = bool(rng.random() < 0.6)
            vals = rng.integers(0, 2**word_size, n).tolist()
            blocks.append((run, idx, [vals[0], n] if run else vals))
            num += n
        writer = _BitWriter(num, word_size, rle_sizes)
        for b in blocks:
            writer.block(*b)
        stream = writer.to_list()
        assert np.array_equal(decode_values(stream), sdk.decode_rle(stream)), (word_size, rle_sizes)


def test_last_run_overshooting_num_is_cut_like_sdk():
    writer = _BitWriter(10, 8, (3, 4, 8, 16))
    writer.block(True, 0, [255, 4])
    writer.block(True, 1, [7, 9])  # 13 values for a 10-value image
    stream = writer.to_list()
    assert np.array_equal(decode_values(stream), sdk.decode_rle(stream))


def test_corrupt_streams_raise_one_line_errors():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 3:20] = True
    rle = mask_to_rle(mask)
    with pytest.raises(BrushRLEError, match="ends"):
        decode_mask(rle[: len(rle) // 2], 20, 30)
    with pytest.raises(BrushRLEError, match="expected 25x30x4"):
        decode_mask(rle, 25, 30)
    with pytest.raises(BrushRLEError, match="0..255"):
        decode_mask([*rle[:-1], 300], 20, 30)
    with pytest.raises(BrushRLEError, match="too short"):
        decode_mask([1, 2], 20, 30)
    with pytest.raises(BrushRLEError, match="0..255"):
        decode_mask("not an rle", 20, 30)
