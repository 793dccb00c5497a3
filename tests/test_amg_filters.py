"""The pure pieces of automatic mask generation, on crafted inputs (and against Meta's reference helpers)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.amg_filters import (
    bilinear_taps,
    crop_boxes,
    layer_point_grids,
    masks_to_boxes,
    near_crop_edge,
    nms,
    point_grid,
    remove_small_regions,
    resize_window,
    stability_score,
    support_window,
)
from tests.sam_reference_shim import import_segment_anything


@pytest.fixture(scope="module")
def ref_amg():
    import_segment_anything()
    from segment_anything.utils import amg

    return amg


def test_point_grid_is_cell_centres_row_major(ref_amg):
    g = point_grid(4)
    assert g.shape == (16, 2)
    assert np.allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875]) and np.allclose(g[:4, 1], 0.125)
    assert np.allclose(g, ref_amg.build_point_grid(4))
    grids = layer_point_grids(32, 2, 2)
    assert [len(x) for x in grids] == [32 * 32, 16 * 16, 8 * 8]


@pytest.mark.parametrize("size", [(600, 800), (1500, 1125), (257, 513)])
def test_crop_boxes_layers_and_overlap(size, ref_amg):
    boxes, layers = crop_boxes(size, 2, 512 / 1500)
    assert layers == [0] + [1] * 4 + [2] * 16
    h, w = size
    assert boxes[0] == [0, 0, w, h]
    assert (boxes, layers) == ref_amg.generate_crop_boxes(size, 2, 512 / 1500)
    for layer in (1, 2):
        layer_boxes = np.array([b for b, l in zip(boxes, layers) if l == layer])
        covered = np.zeros(size, int)
        for x0, y0, x1, y1 in layer_boxes:
            covered[y0:y1, x0:x1] += 1
        assert covered.min() >= 1  # the crops of a layer cover the image...
        assert (covered >= 2).any()  # ...and overlap


def test_stability_score_on_crafted_logits(ref_amg):
    # a cone: logit = 10 - distance from the centre; thresholds 0 +- 1 give discs of radius 9 and 11
    yy, xx = np.mgrid[0:64, 0:64]
    cone = torch.tensor(10.0 - np.hypot(yy - 32, xx - 32), dtype=torch.float32)
    steep = cone * 10  # a sharper edge: the +-1 discs are nearly the same
    flat = torch.full((64, 64), -5.0)
    logits = torch.stack([cone, steep, flat])
    s = stability_score(logits, 0.0, 1.0)
    assert s[0] == pytest.approx((cone > 1).sum().item() / (cone > -1).sum().item())
    assert 0.6 < s[0] < 0.7 and s[1] > 0.9
    assert s[2] == 0.0  # empty mask: 0, not NaN
    ref = ref_amg.calculate_stability_score(logits[:2], 0.0, 1.0)
    assert torch.allclose(s[:2], ref)


def test_masks_to_boxes_inclusive_and_empty(ref_amg):
    m = torch.zeros((3, 10, 12), dtype=torch.bool)
    m[0, 2:5, 3:9] = True
    m[1, 9, 11] = True
    boxes = masks_to_boxes(m)
    assert boxes.tolist() == [[3, 2, 8, 4], [11, 9, 11, 9], [0, 0, 0, 0]]
    rng = np.random.default_rng(0)
    r = torch.as_tensor(rng.random((5, 20, 30)) > 0.97)
    assert torch.equal(masks_to_boxes(r), ref_amg.batched_mask_to_box(r))


def test_nms_greedy_semantics():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.1])
    keep = nms(boxes, scores, 0.7)
    # box 3 (best score) suppresses box 0 (IoU 0.95); box 1 goes only if its IoU with 3 is > 0.7
    assert keep[0] == 3 and 0 not in keep and 2 in keep and 4 in keep
    iou_13 = (9 * 9.5) / (10 * 10.5 + 100 - 9 * 9.5)
    assert (1 in keep) == (iou_13 <= 0.7)
    assert list(nms(boxes, scores, 1.0)) == [3, 0, 1, 2, 4]  # nothing overlaps more than 1.0
    assert len(nms(np.zeros((0, 4)), np.zeros(0), 0.5)) == 0


def test_nms_ties_keep_input_order_and_match_reference_on_random_boxes():
    from tests.sam_reference_shim.torchvision.ops.boxes import batched_nms

    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    assert list(nms(boxes, np.array([1.0, 1.0]), 0.5)) == [0]
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (300, 2))
    wh = rng.uniform(5, 40, (300, 2))
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    s = rng.random(300).astype(np.float32)
    ref = batched_nms(torch.tensor(b), torch.tensor(s), torch.zeros(300), 0.5).numpy()
    assert list(nms(b, s, 0.5)) == list(ref)


def test_near_crop_edge_ignores_image_edges():
    crop = [0, 0, 100, 100]  # top-left crop of a 200x200 image: its right and bottom edges are inner
    image = [0, 0, 200, 200]
    boxes = torch.tensor([[0, 0, 50, 50],  # on image edges only: kept
                          [40, 40, 95, 60],  # within 20 px of the inner right edge: dropped
                          [10, 10, 60, 79],  # 21 px from the inner bottom edge: kept
                          [10, 10, 60, 80]])  # 20 px: dropped
    assert near_crop_edge(boxes, crop, image).tolist() == [False, True, False, True]
    full = near_crop_edge(boxes, image, image)
    assert not full.any()


def test_remove_small_regions_holes_and_islands(ref_amg):
    m = np.zeros((60, 60), bool)
    m[10:40, 10:40] = True
    m[20:25, 20:25] = False  # a 25 px hole
    m[50:53, 50:53] = True  # a 9 px island
    filled, changed = remove_small_regions(m, 30, "holes")
    assert changed and filled[20:25, 20:25].all() and filled[50:53, 50:53].all()
    cleaned, changed = remove_small_regions(filled, 30, "islands")
    assert changed and not cleaned[50:53, 50:53].any() and cleaned[10:40, 10:40].all()
    same, changed = remove_small_regions(cleaned, 30, "islands")
    assert not changed and same is cleaned
    # all islands small: the largest stays
    tiny = np.zeros((20, 20), bool)
    tiny[1:3, 1:3] = True
    tiny[10:13, 10:13] = True
    kept, changed = remove_small_regions(tiny, 100, "islands")
    assert changed and kept.sum() == 9 and kept[10:13, 10:13].all()
    for mode in ("holes", "islands"):
        ours, c1 = remove_small_regions(m, 30, mode)
        ref, c2 = ref_amg.remove_small_regions(m, 30, mode)
        assert c1 == c2 and np.array_equal(ours, ref)


def test_remove_small_regions_outside_is_never_a_hole():
    # a patch with a one-pixel border standing for the rest of the image: the border's component stays
    patch = np.zeros((8, 8), bool)
    patch[1:7, 1:7] = True
    patch[1:3, 1:3] = False  # a background pocket touching the outside border
    outside = np.zeros_like(patch)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = True, True, True, True
    kept, changed = remove_small_regions(patch, 100, "holes", outside)
    assert not changed and np.array_equal(kept, patch)
    filled, changed = remove_small_regions(patch, 100, "holes")  # without the hint the pocket is filled
    assert changed and filled.all()


@pytest.mark.parametrize("h, w, out_h, out_w", [(128, 96, 1500, 1125), (100, 128, 301, 385), (128, 128, 128, 128),
                                                (75, 60, 40, 33), (64, 64, 1499, 1500)])
def test_resize_window_is_a_window_of_torch_bilinear(h, w, out_h, out_w):
    rng = np.random.default_rng(h + out_w)
    x = (rng.normal(size=(h, w)) * 5).astype(np.float32)
    full = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], (out_h, out_w), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    rows, cols = bilinear_taps(h, out_h), bilinear_taps(w, out_w)
    r0, r1, c0, c1 = out_h // 5, out_h - 1, 3, out_w * 2 // 3
    win = resize_window(x, rows, cols, r0, r1, c0, c1)
    assert win.shape == (r1 - r0, c1 - c0)
    np.testing.assert_allclose(win, full[r0:r1, c0:c1], rtol=0, atol=1e-5)
    assert np.array_equal(resize_window(x, rows, cols, 0, out_h, 0, out_w) > 0, full > 0)


@pytest.mark.parametrize("seed", range(4))
def test_support_window_holds_every_value_above_the_level(seed):
    rng = np.random.default_rng(seed)
    h, w, out_h, out_w = 40, 32, 301, 250
    x = np.full((h, w), -5.0, np.float32)
    y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
    x[y0:y0 + rng.integers(1, 6), x0:x0 + rng.integers(1, 6)] = rng.uniform(0.5, 8)
    full = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], (out_h, out_w), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    rows, cols = bilinear_taps(h, out_h), bilinear_taps(w, out_w)
    above = x > -1.0
    r0, r1, c0, c1 = support_window(above.any(1), above.any(0), rows, cols)
    inside = np.zeros_like(full, bool)
    inside[r0:r1, c0:c1] = True
    assert (full > -1.0).any() and not ((full > -1.0) & ~inside).any()
    assert (r1 - r0) * (c1 - c0) < 0.25 * out_h * out_w  # a window, not the whole frame
    assert support_window(np.zeros(h, bool), np.zeros(w, bool), rows, cols) is None
