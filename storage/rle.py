"""COCO compressed RLE, batched, through pycocotools.

An RLE is `{"size": [h, w], "counts": bytes}`; counts may also arrive as `str` (COCO JSON), both are
accepted.

Encoding: COCO runs go column-major, but the project's masks are (N, H, W) row-major, and
transposing a whole 1500 px mask for pycocotools costs ~10x the encode itself. So the runs are
found inside each mask's bounding box with numpy (row-major reads, a transposed copy of the box
only) and pycocotools compresses them (`frPyObjects`); the bytes are identical to
`pycocotools.mask.encode` (tested). Masks already column-major go straight to pycocotools.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def _as_coco(rles: Sequence[dict]) -> list[dict]:
    """pycocotools wants counts as bytes and size as a list; normalise both."""
    out = []
    for r in rles:
        counts = r["counts"]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        elif isinstance(counts, list):  # uncompressed RLE (COCO iscrowd): compress it first
            h, w = r["size"]
            out.append(mask_utils.frPyObjects({"size": [int(h), int(w)], "counts": counts}, int(h), int(w)))
            continue
        out.append({"size": [int(r["size"][0]), int(r["size"][1])], "counts": bytes(counts)})
    return out


def encode_masks(masks: np.ndarray) -> list[dict]:
    """masks: (N, H, W) bool (or 0/1 ints) -> N COCO RLE dicts with counts as bytes."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks: expected (N, H, W) masks, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    masks = masks if masks.dtype == np.bool_ else masks != 0
    n, h, w = masks.shape
    hwn = masks.transpose(1, 2, 0)
    if hwn.flags.f_contiguous:  # e.g. the output of decode_rles: pycocotools reads it in place
        rles = mask_utils.encode(hwn.view(np.uint8))
    else:
        rles = mask_utils.frPyObjects([{"size": [h, w], "counts": column_major_runs(m)} for m in masks], h, w)
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"]} for r in rles]


def column_major_runs(mask: np.ndarray) -> np.ndarray:
    """mask: (H, W) bool -> uncompressed COCO RLE counts (uint32): alternating run lengths in
    column-major order, starting with a (possibly empty) run of zeros. Work is O(bounding box)."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.array([h * w], np.uint32)
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(mask[y0:y1].any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    return patch_runs(mask[y0:y1, x0:x1], x0, y0, (h, w))


def patch_runs(patch: np.ndarray, x0: int, y0: int, size: tuple[int, int]) -> np.ndarray:
    """The counts of `column_major_runs` for a mask given as the (ph, pw) bool `patch` at pixel (x0, y0) of
    an all-zero (H, W) frame: no full-size mask is ever made."""
    h, w = size
    ph, pw = patch.shape
    if ph == 0 or pw == 0:
        return np.array([h * w], np.uint32)
    y1, x1 = y0 + ph, x0 + pw
    # Take one zero row above and below the box so the runs' starts and ends show up as changes.
    # A box touching the bottom row runs on into the next column's top rows: take full columns then.
    yb = y1 + 1 if y1 < h else h
    ya = y0 - 1 if (y0 > 0 and yb < h) else 0
    box_w, box_h = x1 - x0, yb - ya
    # cols_t[x, 0]: the pixel just before column x's first pixel (column-major); cols_t[x, 1:]: column x.
    cols_t = np.zeros((box_w, box_h + 1), np.bool_)
    cols_t[:, 1 + y0 - ya: 1 + y1 - ya] = patch.T
    if ya == 0 and yb == h:  # full columns: each one continues where the previous ended
        cols_t[1:, 0] = cols_t[:-1, -1]
    changes = np.flatnonzero(cols_t[:, 1:] != cols_t[:, :-1])
    x, r = np.divmod(changes, box_h)
    positions = (x0 + x) * h + ya + r
    if yb == h and cols_t[-1, -1] and x1 < w:  # the last column ends inside the mask
        positions = np.append(positions, x1 * h)
    return np.diff(np.concatenate(([0], positions, [h * w]))).astype(np.uint32)


def encode_patches(patches: Sequence[np.ndarray], origins: Sequence[tuple[int, int]],
                   size: tuple[int, int]) -> list[dict]:
    """Masks given as bool patches at (x0, y0) pixel origins of an (H, W) image -> COCO RLE dicts, the same
    bytes as `encode_masks` of the full masks (tested) at a cost of O(patch) each."""
    h, w = size
    if len(patches) == 0:
        return []
    runs = [{"size": [h, w], "counts": patch_runs(np.asarray(p, bool), int(x0), int(y0), (h, w))}
            for p, (x0, y0) in zip(patches, origins)]
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"]}
            for r in mask_utils.frPyObjects(runs, h, w)]


def decode_rles(rles: Sequence[dict]) -> np.ndarray:
    """N COCO RLE dicts (all of one size) -> (N, H, W) bool."""
    if len(rles) == 0:
        return np.zeros((0, 0, 0), bool)
    coco = _as_coco(rles)
    sizes = {tuple(r["size"]) for r in coco}
    if len(sizes) != 1:
        raise ValueError(f"decode_rles: masks of different sizes in one batch: {sorted(sizes)}")
    decoded = mask_utils.decode(coco)  # (H, W, N) uint8, Fortran order
    # A view, not a copy: each mask stays column-major in memory (transposing costs ~10 ms/mask).
    return decoded.view(np.bool_).transpose(2, 0, 1)


def rle_area(rles: Sequence[dict]) -> np.ndarray:
    """(N,) int64 pixel counts of N RLEs."""
    if len(rles) == 0:
        return np.zeros((0,), np.int64)
    coco = _as_coco(rles)
    # pycocotools' `area` sizes an internal uint8 array by the count, which overflows at 256 under
    # numpy 2; chunks below that limit sidestep it.
    return np.concatenate([np.asarray(mask_utils.area(coco[i:i + 255]), dtype=np.int64).reshape(-1)
                           for i in range(0, len(coco), 255)])


def rle_bbox(rles: Sequence[dict]) -> np.ndarray:
    """(N, 4) float64 XYWH pixel boxes of N RLEs (zeros for an empty mask)."""
    if len(rles) == 0:
        return np.zeros((0, 4), np.float64)
    return np.asarray(mask_utils.toBbox(_as_coco(rles)), dtype=np.float64).reshape(-1, 4)


def rle_to_str(rle: dict) -> dict:
    """An RLE with counts as str, for JSON (COCO files, Label Studio payloads)."""
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, (bytes, bytearray)) else counts}


def compressed_counts(counts: bytes | str) -> np.ndarray:
    """COCO compressed `counts` -> (K,) int64 run lengths, as pycocotools' rleFrString reads them, but
    checked: raises ValueError (one line) on a byte outside the alphabet ('0'..'o') or a number cut off
    in the middle (a truncated string). Runs are not checked here; see `rle_problem`."""
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(data, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros((0,), np.int64)
    if c.min() < 0 or c.max() > 63:
        bad = int(np.flatnonzero((c < 0) | (c > 63))[0])
        raise ValueError(f"byte {bad} of the counts ({data[bad]!r}) is not in COCO's RLE alphabet")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("the counts end inside a number (truncated)")
    ends = np.flatnonzero(~more)  # the last character of each number
    starts = np.concatenate([[0], ends[:-1] + 1])
    number = np.repeat(np.arange(len(ends)), ends - starts + 1)
    k = np.arange(c.size) - starts[number]  # 5-bit group index within its number
    if k.max() > 12:
        raise ValueError("a run length in the counts has more than 60 bits")
    x = np.zeros(len(ends), np.int64)
    np.add.at(x, number, (c & 0x1F) << (5 * k))
    negative = (c[ends] & 0x10) != 0  # the sign bit of each number's last group
    x[negative] -= np.int64(1) << (5 * (k[ends][negative] + 1))
    # runs after the second are stored as differences to the run two before (pycocotools' m > 2)
    runs = x.copy()
    runs[3::2] = x[1] + np.cumsum(x[3::2]) if len(x) > 3 else runs[3::2]
    runs[4::2] = x[2] + np.cumsum(x[4::2]) if len(x) > 4 else runs[4::2]
    return runs


def rle_problem(counts: bytes | str, height: int, width: int) -> str | None:
    """Why a stored RLE cannot be a (height, width) mask, or None when it can: size not positive, counts
    not decodable, a negative run, or runs that do not add up to height x width pixels (a truncated
    string, a doubled height)."""
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))) or height <= 0 or width <= 0:
        return f"size {height}x{width} is not a positive size"
    try:
        runs = compressed_counts(counts)
    except ValueError as e:
        return str(e)
    if runs.size and runs.min() < 0:
        return "the counts hold a negative run"
    total = int(runs.sum())
    if total != int(height) * int(width):
        return f"the runs cover {total} pixels, not {height}x{width} = {int(height) * int(width)}"
    return None


def upscale_rle_nearest(rle: dict, size: tuple[int, int]) -> tuple[dict, int, tuple[int, int, int, int] | None]:
    """An (h, w) COCO RLE -> the RLE of its nearest-neighbour resize to `size` (H, W) (destination pixel
    (y, x) takes source pixel (floor(y * h / H), floor(x * w / W)), in exact integers), without making a mask
    of either size:
    O(source runs x W / w). Returns (rle, area, bbox XYXY inclusive pixels or None when empty).

    For masks bound for very large images: the model saw a downscaled copy, and a full-resolution float
    resize of each mask costs time and memory in proportion to the original's pixels."""
    h, w = (int(v) for v in rle["size"])
    H, W = (int(v) for v in size)
    runs = compressed_counts(rle["counts"])
    ends = np.cumsum(runs)
    s, e = (ends - runs)[1::2], ends[1::2]  # runs of ones: flat column-major source index [s, e)
    keep = e > s
    s, e = s[keep], e[keep]
    if len(s) == 0:
        return {"size": [H, W], "counts": mask_utils.frPyObjects(
            {"size": [H, W], "counts": [H * W]}, H, W)["counts"]}, 0, None
    # Split every run at source column ends: pieces (column c, rows r0:r1)
    c0, c1 = s // h, (e - 1) // h
    n = c1 - c0 + 1
    run = np.repeat(np.arange(len(s)), n)
    col = c0[run] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    r0 = np.maximum(s[run], col * h) - col * h
    r1 = np.minimum(e[run], (col + 1) * h) - col * h
    # Source rows [r0, r1) -> destination rows [Y0, Y1); source column c -> destination columns [X0, X1)
    Y0, Y1 = (r0 * H + h - 1) // h, (r1 * H + h - 1) // h
    X0, X1 = (col * W + w - 1) // w, ((col + 1) * W + w - 1) // w
    ok = (Y1 > Y0) & (X1 > X0)
    Y0, Y1, X0, X1 = Y0[ok], Y1[ok], X0[ok], X1[ok]
    if len(Y0) == 0:
        return upscale_rle_nearest({"size": [h, w], "counts": mask_utils.frPyObjects(
            {"size": [h, w], "counts": [h * w]}, h, w)["counts"]}, size)
    m = X1 - X0
    piece = np.repeat(np.arange(len(Y0)), m)
    X = X0[piece] + (np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m))
    starts, stops = X * H + Y0[piece], X * H + Y1[piece]
    order = np.argsort(starts, kind="stable")
    starts, stops = starts[order], stops[order]
    # Merge intervals that touch (a run going on into the next column)
    new = np.concatenate(([True], starts[1:] != stops[:-1]))
    starts, stops = starts[new], stops[np.concatenate((np.flatnonzero(new)[1:] - 1, [len(new) - 1]))]
    edges = np.empty(2 * len(starts), np.int64)
    edges[0::2], edges[1::2] = starts, stops
    counts = np.diff(np.concatenate(([0], edges, [H * W])))
    if counts[-1] == 0:  # a mask running to the last pixel: pycocotools writes no empty last run
        counts = counts[:-1]
    area = int((stops - starts).sum())
    bbox = (int(X.min()), int(Y0.min()), int(X.max()), int(Y1.max()) - 1)
    out = mask_utils.frPyObjects({"size": [H, W], "counts": counts.astype(np.uint32).tolist()}, H, W)
    return {"size": [H, W], "counts": out["counts"]}, area, bbox
