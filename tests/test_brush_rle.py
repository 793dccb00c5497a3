"""Our brush RLE codec is bit-identical to label_studio_sdk.converter.brush (the reference)."""
from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush as sdk

from storage.brush_rle import (_UNKNOWN, BrushRLEError, _pair_sizes, _run_starts, decode_alpha,
                               decode_mask, decode_runs, decode_values, encode_values, mask_to_rle)


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


def test_rest_of_a_long_run_is_a_16_bit_run_block_like_sdk():
    # A run over 65536 values ends in a rest that the SDK writes as a 16-bit run block whatever
    # its length, even 1 (a run block of one value, not a literal).
    for rest in (1, 2, 4, 9, 16, 17, 300):
        for n_full in (1, 3):
            values = np.concatenate([[5], np.full(n_full * 65536 + rest, 7), [5, 6, 6]]).astype(np.uint8)
            reference = sdk.encode_rle(values)
            assert encode_values(values).tolist() == reference, (rest, n_full)
            assert np.array_equal(decode_values(reference), values)
    # As a mask: a run of 16385 pixels is 65540 values, a rest of 4.
    mask = np.zeros((4, 16385), bool)
    mask[1] = True
    assert mask_to_rle(mask) == sdk.mask2rle(mask.astype(np.uint8) * 255)


def _binary_patterns(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    period8 = np.tile(np.array([0, 1, 1, 0, 0, 0, 1, 0], np.uint8), n // 8 + 2)
    blocky = np.repeat(rng.integers(0, 2, n), rng.integers(1, 200, n))[:n].astype(np.uint8)
    return [rng.integers(0, 2, n).astype(np.uint8), np.zeros(n, np.uint8), np.ones(n, np.uint8), blocky,
            period8[:n],  # equal words with changes inside: the 8-at-a-time path must give up
            np.concatenate([blocky[: n // 2], period8[: n - n // 2]]),  # ... also when they come last
            np.concatenate([period8[: n // 3], blocky[n // 3:]])]


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 63, 64, 65, 127, 130, 1000, 4099])
def test_run_starts_match_plain_numpy(n):
    rng = np.random.default_rng(n)
    many_values = np.repeat(rng.integers(0, 256, n), rng.integers(1, 90, n))[:n].astype(np.uint8)
    for values in [*_binary_patterns(n, rng), many_values]:
        expected = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
        assert np.array_equal(_run_starts(values), expected)
        if values.max(initial=0) <= 1:
            assert np.array_equal(_run_starts(values, binary=True), expected)


def test_run_starts_right_when_denormals_are_zero():
    # The 8-at-a-time paths compare 0/1 bytes as float64 (often subnormal); torch can make this
    # thread treat subnormals as zero, and then the integer paths must run.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    mask = np.zeros((60, 70), bool)
    mask[10:40, 3:50] = True
    mask[45, 20] = True
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no denormals-are-zero mode")
    try:
        assert not np.not_equal(np.array([np.finfo(np.float64).smallest_subnormal]), 0)[0]
        for values in _binary_patterns(1000, rng):
            expected = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
            assert np.array_equal(_run_starts(values, binary=True), expected)
        assert mask_to_rle(mask) == sdk.mask2rle(mask.astype(np.uint8) * 255)
    finally:
        torch.set_flush_denormal(False)


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


def test_blocks_the_pair_table_cannot_size_take_the_exact_path():
    # Literal blocks whose count field runs past the 16 bits at their start (a 16-bit count; an
    # 8-bit count starting at bit 6 of a byte) or whose size passes 254 bits (32 words of 8 bits)
    # are sized exactly.
    rng = np.random.default_rng(11)
    for rle_sizes, index, n, lead_runs in [((3, 4, 8, 16), 3, 5, []), ((3, 4, 8, 16), 2, 3, [1, 1, 2]),
                                           ((5, 4, 8, 16), 0, 32, [])]:
        writer = _BitWriter(0, 8, rle_sizes)
        for i in lead_runs:
            writer.block(True, i, [200, 2])
        at = len(writer.bits)  # bit position of the wide literal block
        words = rng.integers(0, 256, n).tolist()
        writer.block(False, index, words)
        writer.block(True, 1, [9, 12])
        writer.block(False, index, words[::-1])
        writer.bits = f"{2 * len(lead_runs) + 2 * n + 12:032b}" + writer.bits[32:]
        stream = writer.to_list()
        pair = (stream[at // 8] << 8) | stream[at // 8 + 1]
        assert _pair_sizes(rle_sizes, 8).view(np.uint8).reshape(-1, 8)[pair, at % 8] == _UNKNOWN
        assert np.array_equal(decode_values(stream), sdk.decode_rle(stream)), (rle_sizes, index)


def test_trailing_bytes_after_the_last_block_are_ignored_like_sdk():
    mask = np.zeros((30, 40), bool)
    mask[3:20, 5:33] = True
    rle = mask_to_rle(mask) + [255, 0, 17, 3]
    assert np.array_equal(decode_mask(rle, 30, 40), mask)
    assert np.array_equal(decode_values(rle), sdk.decode_rle(rle))
    num, lengths, values = decode_runs(rle)
    assert num == lengths.sum() == 30 * 40 * 4


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
    with pytest.raises(BrushRLEError, match="0..255"):
        decode_mask(4800, 20, 30)


def test_coloured_and_semi_transparent_strokes_decode_like_sdk():
    """Issue 31.13: people's strokes are coloured (the label's colour), drawn with soft, semi-transparent
    edges: RGBA pixels whose channels differ. The mask is where the SDK's channel 3 (alpha) is non-zero, and
    nothing else: a blue stroke (R = G = 0) is a mask, a coloured pixel with alpha 0 is not."""
    h, w = 37, 53
    rgba = np.zeros((h, w, 4), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    rgba[(yy - 12) ** 2 + (xx - 15) ** 2 < 64] = (0, 0, 255, 255)  # an opaque blue stroke
    red = (yy - 25) ** 2 + (xx - 38) ** 2 < 81
    rgba[red] = (255, 0, 0, 128)  # a semi-transparent red one
    edge = ((yy - 25) ** 2 + (xx - 38) ** 2 >= 81) & ((yy - 25) ** 2 + (xx - 38) ** 2 < 120)
    rgba[edge] = (255, 0, 0, 0)
    rgba[edge, 3] = np.linspace(1, 254, int(edge.sum())).astype(np.uint8)  # antialiased edge: every alpha
    rgba[0, :10] = (0, 255, 0, 0)  # colour without coverage
    rgba[h - 1, w - 5:] = (7, 200, 90, 3)  # faint but there
    stream = sdk.encode_rle(rgba.reshape(-1))
    sdk_alpha = np.asarray(sdk.decode_rle(stream)).reshape(h, w, 4)[:, :, 3]
    assert np.array_equal(decode_alpha(stream, h, w), sdk_alpha)
    mask = decode_mask(stream, h, w)
    assert np.array_equal(mask, sdk_alpha > 0)
    assert mask[12, 15] and mask[25, 38] and not mask[0, :10].any() and mask[h - 1, w - 5:].all()
