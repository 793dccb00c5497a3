import numpy as np
import pytest
from pycocotools import mask as mask_utils

from engine.integrations.synth import make_scene, scene_rng
from storage.rle import column_major_runs, decode_rles, encode_masks, rle_area, rle_bbox, rle_to_str


def reference_encode(masks: np.ndarray) -> list[bytes]:
    """pycocotools' own encoder on a Fortran (H, W, N) copy: the ground truth for our bytes."""
    return [r["counts"] for r in mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))]


def edge_case_masks(h: int, w: int) -> np.ndarray:
    cases = [np.zeros((h, w), bool), np.ones((h, w), bool)]
    for y, x in [(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0), (h // 2, w // 2)]:
        m = np.zeros((h, w), bool)
        m[y, x] = True
        cases.append(m)
    m = np.zeros((h, w), bool); m[-1, :] = True; cases.append(m)  # bottom row: runs wrap across columns
    m = np.zeros((h, w), bool); m[:, 0] = True; cases.append(m)
    m = np.zeros((h, w), bool); m[h // 2:, w // 2:] = True; cases.append(m)  # touches bottom and right
    m = np.zeros((h, w), bool); m[: h // 2 + 1, :] = True; cases.append(m)  # touches top, spans all columns
    return np.stack(cases)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (7, 1), (5, 9), (31, 17)])
def test_encode_is_byte_identical_to_pycocotools(h, w):
    rng = np.random.default_rng(h * 100 + w)
    random_masks = rng.random((60, h, w)) < rng.random((60, 1, 1))
    for masks in (random_masks, edge_case_masks(h, w)):
        ours = encode_masks(masks)
        assert [r["counts"] for r in ours] == reference_encode(masks)
        assert all(r["size"] == [h, w] for r in ours)


def test_encode_synthetic_scene_masks_and_round_trip():
    _, masks, _ = make_scene(scene_rng(5, 0), 300)
    rles = encode_masks(masks)
    assert [r["counts"] for r in rles] == reference_encode(masks)
    decoded = decode_rles(rles)
    assert decoded.shape == masks.shape and decoded.dtype == bool
    assert np.array_equal(decoded, masks)
    # decode's column-major output goes back through pycocotools directly, same bytes
    assert [r["counts"] for r in encode_masks(decoded)] == [r["counts"] for r in rles]


def test_column_major_runs_sum_to_pixels_and_alternate():
    m = np.zeros((6, 4), bool)
    m[2:4, 1] = True
    m[5, 1] = True
    m[0, 2] = True
    counts = column_major_runs(m)
    # column-major: col 0 zeros(6), col 1: 00 11 0 1, col 2: 1 00000, col 3 zeros
    assert counts.tolist() == [6 + 2, 2, 1, 1 + 1, 5 + 6]
    assert counts.sum() == m.size


def test_area_and_bbox_match_numpy():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 40, 50), bool)
    masks[0, 5:10, 7:20] = True
    masks[1] = rng.random((40, 50)) > 0.7
    masks[3, 39, 49] = True  # masks[2] stays empty
    rles = encode_masks(masks)
    assert rle_area(rles).dtype == np.int64
    assert rle_area(rles).tolist() == masks.sum(axis=(1, 2)).tolist()
    boxes = rle_bbox(rles)
    assert boxes.shape == (4, 4)
    assert boxes[0].tolist() == [7, 5, 13, 5]
    assert boxes[2].tolist() == [0, 0, 0, 0]
    assert boxes[3].tolist() == [49, 39, 1, 1]


def test_str_counts_and_uncompressed_counts_are_accepted():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 7, 7] = True
    rles = encode_masks(masks)
    as_str = [rle_to_str(r) for r in rles]
    assert isinstance(as_str[0]["counts"], str)
    assert np.array_equal(decode_rles(as_str), masks)
    uncompressed = {"size": [8, 8], "counts": [63, 1]}  # COCO iscrowd style
    assert np.array_equal(decode_rles([uncompressed])[0], masks[1])
    assert rle_area([uncompressed]).tolist() == [1]


def test_empty_batches_and_bad_shapes():
    assert encode_masks(np.zeros((0, 4, 4), bool)) == []
    assert decode_rles([]).shape == (0, 0, 0)
    assert rle_area([]).shape == (0,) and rle_bbox([]).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        encode_masks(np.zeros((4, 4), bool))
    a = encode_masks(np.zeros((1, 4, 4), bool))[0]
    b = encode_masks(np.zeros((1, 5, 4), bool))[0]
    with pytest.raises(ValueError, match="different sizes"):
        decode_rles([a, b])


def test_non_bool_masks_are_thresholded_at_nonzero():
    masks = np.zeros((1, 5, 5), np.float32)
    masks[0, 1, 1] = 0.5
    masks[0, 2, 2] = 3.0
    assert rle_area(encode_masks(masks)).tolist() == [2]


def test_area_and_bbox_of_many_rles():
    # pycocotools' area overflows a uint8 counter at 256 RLEs under numpy 2; ours must not.
    masks = np.zeros((600, 9, 7), bool)
    for i in range(600):
        masks[i, : 1 + i % 9, : 1 + i % 7] = True
    rles = encode_masks(masks)
    assert rle_area(rles).tolist() == masks.sum(axis=(1, 2)).tolist()
    assert rle_bbox(rles).shape == (600, 4)


def test_patches_encode_to_the_bytes_of_their_full_masks():
    """RLE straight from a patch at its origin equals pycocotools' encoding of the full mask, including
    patches touching the bottom row (runs continue into the next column) and the image's edges."""
    from pycocotools import mask as mask_utils

    from storage.rle import encode_patches

    rng = np.random.default_rng(0)
    h, w = 97, 131
    patches, origins, full = [], [], []
    for _ in range(200):
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
        m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.3, 0.9, 1.0])
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if rows.size == 0:
            continue
        patches.append(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
        origins.append((cols[0], rows[0]))
        full.append(m)
    got = encode_patches(patches, origins, (h, w))
    ref = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in full]
    assert [g["counts"] for g in got] == [r["counts"] for r in ref]
    assert sum(m[-1].any() for m in full) > 10  # bottom-row cases were exercised


def test_upscaling_an_rle_by_nearest_neighbour_matches_the_full_mask():
    """`upscale_rle_nearest` against the full mask resized by index (pixel (y, x) takes source pixel
    (y * h // H, x * w // W)), decoded and re-encoded by pycocotools: the same pixels, bytes, area and box,
    including masks running over column ends, empty and full masks, and shrinking."""
    from pycocotools import mask as mask_utils

    from storage.rle import upscale_rle_nearest

    rng = np.random.default_rng(5)
    for _ in range(300):
        h, w = rng.integers(1, 30, 2)
        H, W = rng.integers(1, 90, 2)
        kind = rng.integers(4)
        m = (rng.random((h, w)) < 0.5) if kind == 0 else np.full((h, w), kind == 1)
        if kind == 3:
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + rng.integers(1, h + 1), x:x + rng.integers(1, w + 1)] = True
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        up, area, box = upscale_rle_nearest(rle, (int(H), int(W)))
        want = m[(np.arange(H) * h) // H][:, (np.arange(W) * w) // W]
        assert (mask_utils.decode(up).astype(bool) == want).all()
        assert up["counts"] == mask_utils.encode(np.asfortranarray(want.astype(np.uint8)))["counts"]
        assert area == int(want.sum())
        ys, xs = np.nonzero(want)
        assert box == ((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(ys) else None)
