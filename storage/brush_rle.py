"""Label Studio's brush RLE, vectorised with numpy; bit-identical to `label_studio_sdk.converter.brush`.

The format (thi.ng rle-pack, as Label Studio uses it) is a bit stream over the flattened RGBA image
(H * W * 4 bytes; a mask's pixel value is repeated in all 4 channels, the mask is channel 3):

    header: num (32 bits) | word_size - 1 (5) | rle_sizes[0..3] - 1 (4 each)
    blocks: flag (1) | size index (2) | n - 1 (rle_sizes[index] bits) | then
            flag 1: one word repeated n times;  flag 0: n literal words
    padding: zero bits up to a byte boundary; the SDK adds 1..8 (a whole zero byte when aligned)

The SDK's encoder (`mask2rle`) always uses word size 8 and rle_sizes (3, 4, 8, 16); a run of length
1 becomes a one-word literal block; runs longer than 65536 are split into 65536-long pieces.
Our decoder reads any word size / rle_sizes / literal blocks (what Label Studio's front end writes).

Speed comes from never touching single values in Python. Encoding finds run boundaries 8 pixels
at a time and packs the blocks' bit fields with one `bincount`. Decoding sizes a block that
would start at every bit position from a table keyed by the byte pair there, then follows the
chain of block starts from bit 53 in C (`map` feeding `list.extend`), two blocks a step.
"""
from __future__ import annotations

import functools
import itertools
import operator
import struct

import numpy as np

SDK_RLE_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
# The 21 header bits after `num`: word size - 1 (= 7) and the four rle sizes - 1.
_SDK_PARAMS = (7 << 16) | sum((s - 1) << (12 - 4 * i) for i, s in enumerate(SDK_RLE_SIZES))


class BrushRLEError(ValueError):
    """A brush RLE that cannot be decoded; the message names the reason."""


# ------------------------------------------------------------------------------------------ encode


def _run_starts(values: np.ndarray, binary: bool = False) -> np.ndarray:
    """Indices where a new run starts in a 1-D uint8 array (always includes 0). (R,) int64.

    binary: every value is 0 or 1 (the bytes of a numpy bool array), which allows comparing
    8 values at a time.
    """
    n = values.size
    if n == 0:
        return np.zeros(0, np.int64)
    exact = _float_compares_exact()
    if binary and exact and n >= 64:
        starts = _binary_run_starts(values)
        if starts is not None:
            return starts
    # Compare neighbours into a buffer padded to whole 64-byte groups; masks have few runs.
    changed = np.empty(-(-(n - 1) // 64) * 64, dtype=bool)
    changed[n - 1:] = False
    np.not_equal(values[1:], values[:-1], out=changed[: n - 1])
    found = _sparse_flatnonzero(changed, exact)
    starts = np.empty(found.size + 1, np.int64)
    starts[0] = 0
    np.add(found, 1, out=starts[1:])
    return starts


_SUBNORMAL = np.array([np.finfo(np.float64).smallest_subnormal])


def _float_compares_exact() -> bool:
    """Whether float64 compares tell every non-NaN bit pattern apart in this thread.

    The fast paths below compare 8 bytes of 0s and 1s as one float64; such words are often
    subnormal, so a denormals-are-zero mode (e.g. `torch.set_flush_denormal(True)`) would
    make them equal to 0. Then the integer paths run instead.
    """
    return bool(np.not_equal(_SUBNORMAL, 0)[0])


def _nonzero_words(flags: np.ndarray, exact: bool) -> np.ndarray:
    """(8 K,) bool: which 8-byte words of a (64 K,) bool array hold a True.

    As float64 when compares are exact (a bool's bytes are 0 or 1: no NaN or -0.0 can occur),
    which is 2x faster here than comparing uint64.
    """
    return (flags.view(np.float64) if exact else flags.view(np.uint64)) != 0


def _sparse_flatnonzero(flags: np.ndarray, exact: bool) -> np.ndarray:
    """np.flatnonzero of a (64 K,) bool array with few True entries, 3-4x faster. (T,) intp.

    Three levels: 64-flag groups, then 8-flag words, then single flags, each looked at only
    inside the non-zero parts of the level above.
    """
    words = _nonzero_words(flags, exact)
    groups = np.flatnonzero(_nonzero_words(words, exact))
    return _expand_hot(flags, _expand_hot(words, groups))


def _expand_hot(flags: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """Indices of the True flags inside the 8-flag words `hot` of `flags`. (T,) intp."""
    within = np.flatnonzero(flags.view(np.uint64)[hot].view(bool))
    return (hot[within >> 3] << 3) | (within & 7)


def _binary_run_starts(values: np.ndarray) -> np.ndarray | None:
    """_run_starts for 0/1 values (float compares exact), 8 values at a time; None if it can't.

    Neighbouring 8-byte words are compared as float64 (exact for 0/1 bytes); only words that
    differ from the word before them are looked into, byte by byte. That misses nothing unless
    a word with changes inside equals the next word (a pattern repeating every 8 values): then
    None, and the caller compares values one by one.
    """
    n = values.size
    n_words = n // 8
    as_float = values[: n_words * 8].view(np.float64)
    differs = np.empty(-(-n_words // 64) * 64, bool)
    differs[n_words:] = False
    differs[0] = True  # word 0 is always looked into
    np.not_equal(as_float[1:], as_float[:-1], out=differs[1:n_words])
    hot = _expand_hot(differs, np.flatnonzero(_nonzero_words(differs, True)))
    as_words = values[: n_words * 8].view("<u8")
    word = as_words[hot]
    # Every byte against the byte before it at once: XOR the word with itself moved up a byte,
    # the previous word's last byte moved in (word 0 gets its own first byte: no change at 0).
    before = as_words[hot - 1] >> np.uint64(56)
    before[0] = word[0] & np.uint64(0xFF)
    changes = word ^ ((word << np.uint64(8)) | before)
    varied = (changes >> np.uint64(8)) != 0  # changes inside the word
    if (varied[:-1] & (np.diff(hot) != 1)).any() or (varied[-1] and hot[-1] != n_words - 1):
        return None  # a varied word equal to the word after it, which was not looked into
    at = np.flatnonzero(changes.astype("<u8", copy=False).view(bool))  # XORs of 0/1 bytes
    tail = np.arange(n_words * 8, n)
    return np.concatenate([[0], (hot[at >> 3] << 3) | (at & 7), tail[values[tail] != values[tail - 1]]])


def _run_lengths(starts: np.ndarray, n: int) -> np.ndarray:
    """Run starts (R,) in n values -> run lengths (R,) int64 (np.diff with append, less overhead)."""
    lengths = np.empty(starts.size, np.int64)
    np.subtract(starts[1:], starts[:-1], out=lengths[:-1])
    lengths[-1] = n - starts[-1]
    return lengths


_SIZE_LIMITS = np.array([8, 16, 256])  # longest run for size indices 0, 1, 2 (3 takes the rest)
# The bits before the count field by head = flag << 2 | size index, already shifted into place.
_HEAD_CODES = np.array([h << (SDK_RLE_SIZES[h & 3] + 8) for h in range(8)], np.int64)
_CODE_BITS = np.array([3 + s + 8 for s in SDK_RLE_SIZES], np.int64)


def _block_codes(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SDK block codes for runs of `lengths` (>= 1) of 8-bit `values`: (codes int64, nbits int64).

    code = flag (1 bit: a run block) | size index (2) | length - 1 | value (8). A run of one value
    is a one-value literal block; a run over 65536 values becomes 65536-long pieces and a rest,
    all written as 16-bit run blocks, even a rest of one value (as the SDK's `encode_rle` does).
    """
    lengths = lengths.astype(np.int64, copy=False)
    size_index = np.searchsorted(_SIZE_LIMITS, lengths)  # (L > 8) + (L > 16) + (L > 256)
    codes = _HEAD_CODES[size_index + 4 * (lengths > 1)] | ((lengths - 1) << 8) | values
    nbits = _CODE_BITS[size_index]
    long_runs = np.flatnonzero(lengths > 65536)
    if long_runs.size:
        # Every piece but the last is 65536 long: give the run that code, repeat it into its
        # pieces (all 27 bits), then set the last piece's code.
        n_full = (lengths[long_runs] - 1) // 65536
        head = _HEAD_CODES[7] | values[long_runs]
        codes[long_runs] = head | (65535 << 8)
        reps = np.ones(lengths.size, np.int64)
        reps[long_runs] += n_full
        codes, nbits = np.repeat(codes, reps), np.repeat(nbits, reps)
        codes[long_runs + np.cumsum(n_full)] = head | ((lengths[long_runs] - n_full * 65536 - 1) << 8)
    return codes, nbits


def _pack_bits(codes: np.ndarray, nbits: np.ndarray) -> np.ndarray:
    """Concatenate big-endian bit fields (each <= 32 bits) into bytes, SDK padding. -> (B,) uint8."""
    ends = np.cumsum(nbits)
    total = int(ends[-1])
    pad = 8 - total % 8  # 1..8: the SDK pads a whole byte when already aligned
    n_bytes = (total + pad) // 8
    n_words = (n_bytes + 3) // 4 + 1
    starts = ends - nbits
    word = starts >> 5
    # Place each field in a 64-bit window starting at its 32-bit word; fields never overlap, so
    # summing the two halves per word (exact in float64 below 2**53) is the same as OR-ing them.
    window = codes.astype(np.uint64) << (64 - (starts & 31) - nbits).astype(np.uint64)
    hi = (window >> np.uint64(32)).astype(np.float64)
    lo = (window & np.uint64(0xFFFFFFFF)).astype(np.float64)
    acc = np.bincount(word, weights=hi, minlength=n_words) + np.bincount(word + 1, weights=lo,
                                                                          minlength=n_words)
    return acc[:n_words].astype(">u4").view(np.uint8)[:n_bytes].copy()


def encode_values(values: np.ndarray) -> np.ndarray:
    """Brush RLE of a flat uint8 array, like the SDK's `encode_rle(values)`. -> (B,) uint8."""
    values = np.ascontiguousarray(values, dtype=np.uint8).ravel()
    if values.size >= 2**32:
        raise BrushRLEError(f"brush RLE holds at most 2**32-1 values, got {values.size}")
    starts = _run_starts(values)
    lengths = _run_lengths(starts, values.size)
    codes, nbits = _block_codes(lengths, values[starts])
    header = np.array([values.size, _SDK_PARAMS], np.int64)
    return _pack_bits(np.concatenate([header, codes]), np.concatenate([[32, 21], nbits]))


def encode_mask(mask: np.ndarray) -> np.ndarray:
    """Brush RLE of one mask, like the SDK's `mask2rle`. -> (B,) uint8 bytes.

    mask: (H, W) bool (True -> 255) or uint8 (values kept). Each pixel becomes 4 equal RGBA values.
    """
    if mask.ndim != 2:
        raise BrushRLEError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    is_bool = mask.dtype == bool
    pixels = np.ascontiguousarray(mask, dtype=None if is_bool else np.uint8).view(np.uint8).ravel()
    if pixels.size * 4 >= 2**32:
        raise BrushRLEError(f"mask of {mask.shape} is too large for brush RLE")
    # Runs over RGBA values are the pixel runs times 4 (no single-value runs ever occur).
    starts = _run_starts(pixels, binary=is_bool)
    lengths = _run_lengths(starts, pixels.size)
    lengths *= 4
    run_values = pixels[starts] * np.uint8(255) if is_bool else pixels[starts]
    codes, nbits = _block_codes(lengths, run_values)
    header = np.array([pixels.size * 4, _SDK_PARAMS], np.int64)
    return _pack_bits(np.concatenate([header, codes]), np.concatenate([[32, 21], nbits]))


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Brush RLE as Label Studio's JSON holds it (a list of byte values), like the SDK's `mask2rle`."""
    return list(encode_mask(mask).tobytes())  # (twice as fast as .tolist())


# ------------------------------------------------------------------------------------------ decode


def _as_bytes(rle) -> np.ndarray:
    """RLE as Label Studio's JSON holds it (list of ints), bytes or a uint8 array -> (B,) uint8."""
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or (rle.dtype != np.uint8 and (rle.size and (rle.min() < 0 or rle.max() > 255))):
            raise BrushRLEError("brush RLE must be a flat array of byte values 0..255")
        data = rle.astype(np.uint8, copy=False)
    elif isinstance(rle, (str, int, np.integer)):
        raise BrushRLEError("brush RLE must be a list of integers 0..255")
    else:
        try:
            # bytearray() checks each value is 0..255, and reads a list about 3x faster than bytes()
            data = np.frombuffer(bytearray(rle), np.uint8)
        except (TypeError, ValueError):
            raise BrushRLEError("brush RLE must be a list of integers 0..255") from None
    if data.size * 8 < _HEADER_BITS:
        raise BrushRLEError(f"brush RLE too short ({data.size} bytes) for its header")
    return data


def _header(data: np.ndarray) -> tuple[int, int, tuple[int, ...]]:
    """(num, word_size, rle_sizes (4 ints)) from the first 53 bits."""
    bits = int.from_bytes(data[:7].tobytes(), "big") >> (56 - _HEADER_BITS)
    num = bits >> 21
    word_size = ((bits >> 16) & 31) + 1
    rle_sizes = tuple(((bits >> (12 - 4 * i)) & 15) + 1 for i in range(4))
    return num, word_size, rle_sizes


def _byte_pairs(data: np.ndarray) -> np.ndarray:
    """(B + 3,) intp: the big-endian 16 bits starting at each byte (zeros past the end)."""
    padded = np.zeros(data.size + 4, np.intp)
    padded[: data.size] = data
    return (padded[:-1] << 8) | padded[1:]


_UNKNOWN = 255  # a block size the 16 bits of a byte pair cannot tell (or one over 254 bits)


@functools.lru_cache(maxsize=16)
def _pair_sizes(rle_sizes: tuple[int, ...], word_size: int) -> np.ndarray:
    """Size in bits of a block starting at bit r = 0..7 of a byte pair, for every pair value.

    -> (65536,) uint64: each the 8 uint8 sizes for r = 0..7 (the bytes of `table[pair]`, so one
    gather by pair gives the sizes at all 8 bit positions of a byte). A run block's size needs only
    its 3 head bits; a literal block's needs its count field too, which may run past the pair.
    """
    pair = np.arange(65536, dtype=np.int64)
    field_bits = np.asarray(rle_sizes, np.int64)
    sizes = np.empty((65536, 8), np.uint8)
    for r in range(8):
        head = (pair >> (13 - r)) & 7
        field = field_bits[head & 3]
        count_shift = 13 - r - field  # < 0: the count field runs past the pair
        count = ((pair >> np.maximum(count_shift, 0)) & ((1 << field) - 1)) + 1
        run = head >= 4
        size = 3 + field + word_size * np.where(run, 1, count)
        sizes[:, r] = np.where((run | (count_shift >= 0)) & (size < _UNKNOWN), size, _UNKNOWN)
    return sizes.view(np.uint64).ravel()


@functools.lru_cache(maxsize=16)
def _head_tables(rle_sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """By head (flag << 2 | size index, 0..7): (count field width, its shift in a 32-bit window
    that starts at the block, its mask). Each (8,) intp."""
    field = np.array([rle_sizes[h & 3] for h in range(8)], np.intp)
    return field, 29 - field, (1 << field) - 1


def _fields_at(pairs: np.ndarray, pos: np.ndarray, rle_sizes: tuple[int, ...]):
    """(head, count) of blocks starting at bit positions `pos`. Each (P,) intp.

    head = flag << 2 | size index. The head and a count of up to 16 bits fit in the 32 bits
    starting at the block's byte (3 + 16 + 7 <= 32).
    """
    _, shift, mask = _head_tables(rle_sizes)
    q = pos >> 3
    top = (((pairs[q] << 16) | pairs[q + 2]) << (pos & 7)) & 0xFFFFFFFF
    head = top >> 29
    return head, ((top >> shift[head]) & mask[head]) + 1


def _block_chain(jump: np.ndarray, start: int, end: int) -> np.ndarray:
    """Positions visited by k -> jump[k] from `start` while below `end`. (C,) intp, increasing.

    jump: (L,) intp, every value < L and > its index below `end`. The walk is inherently
    sequential, so it runs in C: `map` looks up each position the list already holds while
    `list.extend` appends the result to that same list, until a lookup past the table raises
    IndexError. One pointer-doubling gather lets it take two steps at a time; the skipped steps
    are filled back in with one vectorised gather.
    """
    step2 = np.take(jump, jump, mode="wrap")  # all in range; "wrap" is faster than "raise"
    step2[end:] = step2.size  # from past the end, one more step, then IndexError
    coarse = [start]
    try:
        coarse.extend(map(operator.getitem, itertools.repeat(memoryview(step2)), coarse))
    except IndexError:
        pass
    coarse = coarse[:-2]  # the last two are past the end
    # struct reads a list of ints into bytes 3x faster than np.array does.
    even = np.frombuffer(struct.pack(f"{len(coarse)}q", *coarse), np.int64).astype(np.intp, copy=False)
    chain = np.empty(2 * even.size, np.intp)
    chain[0::2] = even
    np.take(jump, even, out=chain[1::2])
    return chain[:-1] if chain[-1] >= end else chain


_POSITIONS = np.arange(0)


def _positions(n: int) -> np.ndarray:
    """np.arange(n) (intp), from a cached buffer that grows to the largest n asked for."""
    global _POSITIONS
    if n > _POSITIONS.size:
        _POSITIONS = np.arange(max(n, 2 * _POSITIONS.size))
    return _POSITIONS[:n]


def _decode(rle) -> tuple[int, np.ndarray, np.ndarray]:
    """Parse a brush RLE into value runs: (num, run ends (R,) int64, run values (R,) uint8).

    Run r covers values [ends[r - 1], ends[r]); ends[-1] == num. Follows the reference decoder
    exactly: blocks are read until `num` values are produced; a final run that overshoots `num`
    is cut (as the SDK's slice assignment does); a literal block that overshoots is an error, as
    is a stream that ends before `num` values.

    Block starts: the size of a block that would start at each bit position comes from a table
    keyed by the byte pair there; the actual starts are the chain of jumps from bit 53. Sizes the
    pair cannot tell (wide literal counts) are filled in exactly, only when the chain meets one.
    """
    data = _as_bytes(rle)
    num, word_size, rle_sizes = _header(data)
    if word_size > 8:
        # The reference decoder writes into uint8 and cannot hold wider words either.
        raise BrushRLEError(f"brush RLE word size {word_size} is not supported (max 8)")
    if num == 0:
        return 0, np.zeros(0, np.int64), np.zeros(0, np.uint8)
    n_bits = data.size * 8
    pairs = _byte_pairs(data)
    sizes = _pair_sizes(rle_sizes, word_size)[pairs[: data.size]].view(np.uint8)  # (n_bits,)
    # jump[k] = start of the next block if one starts at k; everything past the data leads to the
    # last slot, a fixed point (sizes <= 255 keep every jump inside the array).
    jump = np.empty(n_bits + 256, np.intp)
    np.copyto(jump[:n_bits], sizes)
    jump[:n_bits] += _positions(n_bits)
    jump[n_bits:] = jump.size - 1
    chain = _block_chain(jump, _HEADER_BITS, n_bits)
    head, count = _fields_at(pairs, chain, rle_sizes)
    ends = np.cumsum(count)
    used = int(np.searchsorted(ends, num)) + 1  # blocks needed to reach num values
    literal = head[:used] < 4
    has_literal = bool(literal.any())
    # Only literal blocks can have a size the table does not know; one before `used` makes the
    # rest of the chain a guess: size every such position exactly and walk again.
    if has_literal and (sizes[chain[:used]] == _UNKNOWN).any():
        unknown = np.flatnonzero(sizes == _UNKNOWN)
        u_head, u_count = _fields_at(pairs, unknown, rle_sizes)
        u_size = 3 + _head_tables(rle_sizes)[0][u_head] + word_size * np.where(u_head >= 4, 1, u_count)
        jump[unknown] = np.minimum(unknown + u_size, jump.size - 1)
        chain = _block_chain(jump, _HEADER_BITS, n_bits)
        head, count = _fields_at(pairs, chain, rle_sizes)
        ends = np.cumsum(count)
        used = int(np.searchsorted(ends, num)) + 1
        literal = head[:used] < 4
        has_literal = bool(literal.any())
    if used > chain.size:
        got = int(ends[-1]) if ends.size else 0
        raise BrushRLEError(f"brush RLE ends after {got} of {num} values")
    chain, head, count, ends = chain[:used], head[:used], count[:used], ends[:used]
    field = _head_tables(rle_sizes)[0]
    last_head, last_count = int(head[-1]), int(count[-1])
    end_bit = int(chain[-1]) + 3 + int(field[last_head]) + word_size * (last_count if last_head < 4 else 1)
    if end_bit > n_bits:
        raise BrushRLEError(f"brush RLE ends inside its last block ({end_bit} > {n_bits} bits)")
    value_at = chain + (3 + field)[head]
    if has_literal:
        # Literal blocks hold `count` words each: expand them into runs of one value.
        if last_head < 4 and ends[-1] > num:
            raise BrushRLEError(f"brush RLE literal block runs past its {num} values")
        per_block = np.where(literal, count, 1)
        block_of = np.repeat(np.arange(chain.size), per_block)
        first = np.cumsum(per_block) - per_block
        within = np.arange(block_of.size) - first[block_of]
        value_at = value_at[block_of] + within * word_size
        ends = np.cumsum(np.where(literal[block_of], 1, count[block_of]))
    # A word of <= 8 bits lies within the byte pair at its first bit.
    values = (((pairs[value_at >> 3] << (value_at & 7)) & 0xFFFF) >> (16 - word_size)).astype(np.uint8)
    ends[-1] = num  # the last run may overshoot: cut it
    return num, ends, values


def decode_runs(rle) -> tuple[int, np.ndarray, np.ndarray]:
    """Parse a brush RLE into value runs: (num, run_lengths (R,) int64, run_values (R,) uint8).

    Raises BrushRLEError (one line, naming the reason) for a corrupt stream.
    """
    num, ends, values = _decode(rle)
    return num, _counts(ends), values


def decode_values(rle) -> np.ndarray:
    """All decoded values, like the SDK's `decode_rle(rle)`. -> (num,) uint8."""
    num, lengths, values = decode_runs(rle)
    return np.repeat(values, lengths)


def decode_mask(rle, height: int, width: int) -> np.ndarray:
    """Brush RLE -> (H, W) bool mask: channel 3 (alpha) of the RGBA image is non-zero.

    Equals `decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 0` of the SDK. Raises
    BrushRLEError if the RLE is corrupt or its size disagrees with height * width * 4.
    """
    return np.repeat(*_alpha_runs(rle, height, width, as_bool=True)).reshape(height, width)


def decode_alpha(rle, height: int, width: int) -> np.ndarray:
    """Brush RLE -> (H, W) uint8 channel 3 exactly as the SDK decodes it."""
    return np.repeat(*_alpha_runs(rle, height, width, as_bool=False)).reshape(height, width)


def _alpha_runs(rle, height: int, width: int, as_bool: bool) -> tuple[np.ndarray, np.ndarray]:
    """Runs of channel 3 over pixels: (values (R,) bool or uint8, pixel counts (R,) int64).

    Pixel k reads the value at 4k+3, so a run [s, e) covers pixels ceil((s-3)/4) .. ceil((e-3)/4)-1,
    and ceil((e-3)/4) == e // 4.
    """
    num, ends, values = _decode(rle)
    if num != height * width * 4:
        raise BrushRLEError(f"brush RLE holds {num} values, expected {height}x{width}x4 = "
                            f"{height * width * 4}")
    return (values > 0 if as_bool else values), _counts(ends >> 2)


def _counts(ends: np.ndarray) -> np.ndarray:
    """Run ends (R,) -> run lengths (R,): np.diff(ends, prepend=0) without its overhead."""
    counts = np.empty_like(ends)
    counts[:1] = ends[:1]
    np.subtract(ends[1:], ends[:-1], out=counts[1:])
    return counts
