"""The automatic mask generator end to end: parity with Meta's reference on the same weights, the
patch-based clean-up against full-frame clean-up, the model-failure fallback, and the records."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.amg import AmgParams, clean_patch, generate_masks, generate_with_fallback, to_records
from model.amg_filters import remove_small_regions
from model.segmenter import Segmenter
from storage.records import records_to_table
from storage.rle import decode_rles
from tests.sam_reference_shim import import_segment_anything
from tests.sam_reference_shim.builders import meta_sam_around, meta_vit_sam, save_meta_pth


def tiny_meta_sam():
    """A tiny ViT SAM in Meta's classes (128 px, 16x16 embedding, 32-wide decoder), crafted so that
    SAM's default filters keep some candidates and drop some (see builders.meta_vit_sam)."""
    return meta_vit_sam(seed=0, logit_gain=1000.0, iou_shift=0.9)


@pytest.fixture(scope="module")
def same_weights(tmp_path_factory):
    """(Meta's Sam, our Segmenter loaded from the same .pth through our loader)."""
    torch.set_num_threads(1)
    sam = tiny_meta_sam()
    path = tmp_path_factory.mktemp("sam") / "tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, Segmenter.load(path)


def scene(size: int = 128, seed: int = 0) -> np.ndarray:
    """A few flat-coloured shapes on a gradient: (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 90)], -1).astype(np.uint8)
    for _ in range(5):
        cx, cy, r = rng.integers(15, size - 15, 2).tolist() + [int(rng.integers(6, 20))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return img


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a: (N, H, W), b: (M, H, W) bool -> (N, M) IoU."""
    fa, fb = a.reshape(len(a), -1).astype(np.float32), b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    return inter / np.maximum(fa.sum(1)[:, None] + fb.sum(1)[None] - inter, 1)


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_matches_meta_reference_on_same_weights(same_weights, crop_n_layers):
    sam, segmenter = same_weights
    sa = import_segment_anything()
    kw = dict(points_per_side=8, points_per_batch=32, pred_iou_thresh=0.88, stability_score_thresh=0.9,
              stability_score_offset=1.0, box_nms_thresh=1.0, crop_n_layers=crop_n_layers, crop_nms_thresh=1.0,
              crop_n_points_downscale_factor=2, min_mask_region_area=20)
    # NMS off (thresholds 1.0): random weights give image-wide blobs whose boxes all coincide, so NMS
    # would leave one mask; NMS itself is checked against the reference's in test_amg_filters.py
    image = scene()
    ref = sa.SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **kw).generate(image)
    ours = generate_masks(segmenter, image, AmgParams(max_mask_fraction=1.01, **kw))
    assert len(ref) >= 3, "the crafted model should give the reference something to find"
    ref_masks = np.stack([r["segmentation"] for r in ref])
    our_masks = decode_rles([m.rle for m in ours])
    best = iou_matrix(ref_masks, our_masks).max(1)
    assert (best >= 0.9).mean() >= 0.9, f"matched {np.round(best, 3)}"
    assert abs(len(ours) - len(ref)) <= max(1, len(ref) // 10)
    # the SA-1B fields: same prompts and crops as the reference's (blobs repeat, so compare as sets)
    ref_points = {tuple(r["point_coords"][0]) for r in ref}
    our_points = {tuple(m.point_coords[0]) for m in ours}
    assert len(ref_points & our_points) >= 0.9 * len(ref_points)
    assert {tuple(m.crop_box) for m in ours} == {tuple(float(v) for v in r["crop_box"]) for r in ref}
    j = int(np.argmax(best))
    k = int(np.argmax(iou_matrix(ref_masks[j:j + 1], our_masks)[0]))
    assert ours[k].predicted_iou == pytest.approx(ref[j]["predicted_iou"], abs=0.05)
    assert ours[k].area == int(our_masks[k].sum())


def test_filters_hold_on_every_output(same_weights):
    _, segmenter = same_weights
    image = scene(seed=3)
    p = AmgParams(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.8, crop_n_layers=1,
                  min_mask_region_area=20)
    masks = generate_masks(segmenter, image, p)
    assert masks
    h, w = image.shape[:2]
    for m in masks:
        assert m.stability_score >= 0.8
        assert 0 < m.area < 0.95 * h * w
        x, y, bw, bh = m.bbox
        cx, cy, cw, ch = m.crop_box
        if (cw, ch) != (w, h):  # a crop mask never ends within 20 px of an inner crop edge
            for side, crop_side, image_side in ((x, cx, 0), (y, cy, 0), (x + bw - 1, cx + cw, w), (y + bh - 1, cy + ch, h)):
                assert abs(side - crop_side) > 20 or abs(side - image_side) <= 20
        decoded = decode_rles([m.rle])[0]
        assert decoded.sum() == m.area
        assert not remove_small_regions(decoded, 20, "islands")[1]  # no island left below min area
    strict = generate_masks(segmenter, image, AmgParams(points_per_side=8, pred_iou_thresh=2.0))
    assert strict == []  # predicted IoU never exceeds 2


def crafted_compact(seed: int = 1) -> Segmenter:
    """Our compact model with random weights moved as tiny_meta_sam's are (logits spread, IoU ~0.9)."""
    seg = Segmenter.new("compact", seed=seed)
    dec = seg.net.mask_decoder
    with torch.no_grad():
        for mlp in dec.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(300.0)
        dec.iou_prediction_head.proj_out.bias.add_(0.9)
    return seg


def test_compact_model_in_meta_layout_loads_and_matches_reference(tmp_path):
    """Our compact encoder inside Meta's Sam, saved as a Meta-layout .pth: our loader gives back the
    same weights, and both generators find the same masks on an image that is resized both ways."""
    torch.set_num_threads(1)
    seg = crafted_compact()
    path = save_meta_pth(meta_sam_around(seg), tmp_path / "compact.pth", seg.arch)
    loaded = Segmenter.load(path)
    assert loaded.arch == seg.arch and loaded.model_version.startswith("compact-")
    for k, v in seg.net.state_dict().items():
        assert torch.equal(v, loaded.net.state_dict()[k]), k
    from tests.sam_reference_shim.builders import load_meta_reference

    sa = import_segment_anything()
    kw = dict(points_per_side=8, points_per_batch=32, pred_iou_thresh=0.5, stability_score_thresh=0.6,
              box_nms_thresh=1.0, min_mask_region_area=0)
    image = np.kron(scene(seed=4), np.ones((3, 3, 1), np.uint8))[:300, :384]  # 300 x 384: resized down and up
    ref = sa.SamAutomaticMaskGenerator(load_meta_reference(path), output_mode="binary_mask", **kw).generate(image)
    ours = generate_masks(loaded, image, AmgParams(max_mask_fraction=1.01, **kw))
    assert len(ref) >= 5, "the crafted model should give the reference something to find"
    best = iou_matrix(np.stack([r["segmentation"] for r in ref]), decode_rles([m.rle for m in ours])).max(1)
    assert (best >= 0.9).mean() >= 0.9, f"matched {np.round(best, 3)}"
    assert abs(len(ours) - len(ref)) <= max(1, len(ref) // 10)


@pytest.mark.parametrize("seed", range(6))
def test_clean_patch_equals_full_frame_cleanup(seed):
    rng = np.random.default_rng(seed)
    h, w = 120, 140
    full = np.zeros((h, w), bool)
    for _ in range(8):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        full[y:y + rng.integers(2, 40), x:x + rng.integers(2, 40)] = True
    full[rng.random((h, w)) < 0.02] = False  # pinholes
    if seed % 2:
        full[:, 0:3] = True  # touch the image border
    ys, xs = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
    box = np.array([xs[0], ys[0], xs[-1], ys[-1]])
    patch = full[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
    expect, c1 = remove_small_regions(full, 50, "holes")
    expect, c2 = remove_small_regions(expect, 50, "islands")
    new_patch, new_box, changed = clean_patch(patch, box, (h, w), 50)
    got = np.zeros((h, w), bool)
    got[new_box[1]:new_box[3] + 1, new_box[0]:new_box[2] + 1] = new_patch
    assert changed == (c1 or c2)
    assert np.array_equal(got, expect)


class MemoryBudgetSegmenter(Segmenter):
    """A segmenter on a device with little memory: embedding an image of more than `max_pixels`
    fails the way a real out-of-memory does (a RuntimeError from the allocator)."""

    max_pixels = 50_000  # 128 x 128 fits, 256 x 256 does not

    def embed(self, images, batch_size=4):
        for im in images:
            if im.shape[0] * im.shape[1] > self.max_pixels:
                raise RuntimeError(f"out of memory: tried to allocate {im.shape[0] * im.shape[1] * 4 * 64} bytes")
        return super().embed(images, batch_size)


def test_model_failure_retries_at_smaller_scale(same_weights):
    _, segmenter = same_weights
    budget = MemoryBudgetSegmenter(segmenter.net, segmenter.arch, segmenter.model_version)
    image = np.kron(scene(seed=1), np.ones((2, 2, 1), np.uint8))  # 256 x 256
    p = AmgParams(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.5, min_mask_region_area=0)
    with pytest.raises(RuntimeError):
        generate_masks(budget, image, p)
    masks, scale = generate_with_fallback(budget, image, p)
    assert scale == 0.5 and masks
    for m in masks:
        assert m.rle["size"] == [256, 256]  # back in pixels of the image given
        assert decode_rles([m.rle])[0].sum() == m.area
    budget.max_pixels = 0
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_with_fallback(budget, image, p)


def test_masks_of_a_downscaled_image_come_at_the_original_size(same_weights):
    """`output_size`: the model sees a downscaled copy (as `images.max_side` makes for large photos), the masks
    are upsampled from its logits to the original, with boxes, points and crops in the original's pixels;
    they are the masks the model makes from the original image itself (same encoder input)."""
    _, segmenter = same_weights
    full = np.kron(scene(seed=3), np.ones((2, 2, 1), np.uint8))  # 256 x 256 original
    small = full[::2, ::2].copy()  # the model's 128 px copy
    p = AmgParams(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.5, min_mask_region_area=0)
    got = generate_masks(segmenter, small, p, output_size=(256, 256))
    ref = generate_masks(segmenter, full, p)
    assert got and all(m.rle["size"] == [256, 256] and decode_rles([m.rle])[0].sum() == m.area for m in got)
    assert all(m.crop_box == [0.0, 0.0, 256.0, 256.0] for m in got)
    from model.iou import pairwise_mask_iou

    best = pairwise_mask_iou(decode_rles([m.rle for m in ref]), decode_rles([m.rle for m in got])).max(1)
    assert (best >= 0.9).mean() >= 0.9


def test_records_carry_lineage_and_stable_ids(same_weights):
    _, segmenter = same_weights
    masks = generate_masks(segmenter, scene(seed=2), AmgParams(points_per_side=6, pred_iou_thresh=0.0,
                                                                stability_score_thresh=0.5))
    assert masks
    recs = to_records(masks, "a/b.png", 3, segmenter.model_version)
    again = to_records(masks, "a/b.png", 3, segmenter.model_version)
    assert [r.mask_id for r in recs] == [r.mask_id for r in again]
    assert len({r.mask_id for r in recs}) == len(recs)
    row = records_to_table(recs).to_pylist()[0]
    assert row["stage"] == "auto" and row["origin"] == "auto" and row["round"] == 3
    assert row["model_version"] == segmenter.model_version
    assert row["predicted_iou"] == pytest.approx(masks[0].predicted_iou)
    assert row["point_coords"] == masks[0].point_coords and row["crop_box"] == masks[0].crop_box


def test_gpu_survivor_path_gives_the_cpu_path_s_masks():
    """The GPU path (whole masks, a chunk per call) and the CPU path (windows) keep the same masks with the
    same boxes, patches and stability scores; run here on CPU tensors, both code paths exactly as written."""
    from model.amg import _CropFrame, _survivors_in_windows, _survivors_on_device
    from model.amg_filters import bilinear_taps

    gen = torch.Generator().manual_seed(0)
    kept_any = 0
    for trial in range(8):
        h, w, ch, cw = 96, 128, 150, 200
        mid = torch.randn(12, h, w, generator=gen) * 3
        mid[:6, :, :20] = mid[:6, :30] = mid[:6, -30:] = mid[:6, :, -30:] = -9  # half of them off the edges
        mid = torch.nn.functional.avg_pool2d(mid[:, None], 15, 1, 7)[:, 0] * 8 - 0.5  # smooth blobs
        frame = _CropFrame((32, 32), (h, w), bilinear_taps(h, ch), bilinear_taps(w, cw))
        crop, image = ([0, 0, cw, ch], (ch, cw)) if trial % 2 else ([10, 20, 10 + cw, 20 + ch], (400, 500))
        p = AmgParams(stability_score_thresh=0.3, stability_score_offset=0.5, max_mask_fraction=0.9)
        a = _survivors_in_windows(mid, frame, crop, image, p)
        b = _survivors_on_device(mid, frame, crop, image, p)
        assert a[3] == b[3]
        assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
        assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
        assert np.allclose(a[2], b[2])
        kept_any += len(a[3])
    assert kept_any > 30  # the comparison saw real survivors
