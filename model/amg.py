"""Automatic mask generation: SAM's grid-prompted "segment everything", made fast on CPU.

The algorithm is SAM's (Kirillov et al. 2023, sec. 4 and appendix B): prompt a points_per_side
grid on the whole image and sparser grids on (2^i)^2 overlapping crops per crop layer i, keep 3
masks per point, filter by predicted IoU and stability, drop masks on inner crop edges and masks
covering nearly the whole image, box-NMS within a crop (by predicted IoU) and across crops
(preferring smaller crops), then fill small holes / drop small islands and NMS again with the
changed masks ranked last.

Where the time goes, and what we do about it (py-spy, 1500 px, 32 x 32 grid, compact model: the
mask decoder is ~88 % of our time; Meta's generator spends most of its time resizing every
candidate's logits to full resolution):
- The predicted-IoU filter and a *pre-filter* on stability run on the decoder's own low-res
  logits (N, 3, n, n); most candidates die here.
- Survivors are resized as SAM does (n -> S x S input frame -> crop size, bilinear), but the
  second, big resize is computed only inside the window where the mask at logit > -offset can be
  (a bilinear value is a mix of its two taps per axis); the stability score, mask, box and area
  from that window are exact. Masks are kept as tight bool patches plus their box.
- Small-region clean-up runs on the patch (with a one-pixel border standing for the outside).
- Each final mask is encoded to COCO RLE once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from model.amg_filters import (
    bilinear_taps,
    crop_boxes,
    layer_point_grids,
    near_crop_edge,
    nms,
    remove_small_regions,
    resize_window,
    stability_score,
    support_window,
)
from model.amg_params import AmgParams
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_patches, upscale_rle_nearest

ENCODE_CHUNK = 16
# Above this many output pixels (a downscaled copy of a very large image), masks are made in the model's frame
# and upscaled to the original by nearest neighbour in RLE form: SAM's bilinear resize of every mask's logits
# to the original costs time and memory in proportion to the original (a 110-megapixel photo: minutes and GBs
# per image). 25 Mpx keeps a 6000x4000 photo on the exact path.
EXACT_UPSCALE_MAX_PIXELS = 25_000_000


@dataclass
class AutoMask:
    """One generated mask, in pixels of the image given to `generate_masks`.

    rle: COCO RLE {"size": [H, W], "counts": bytes}; bbox: XYWH (COCO: w = x1 - x0 + 1);
    point_coords: [[x, y]] of the prompt; crop_box: XYWH of the crop it came from.
    """

    rle: dict
    area: int
    bbox: list[float]
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]]
    crop_box: list[float]


@dataclass
class _Candidates:
    """Masks kept so far, as parallel arrays. boxes: (N, 4) int64 XYXY inclusive, image pixels;
    patches[i]: bool (y1 - y0 + 1, x1 - x0 + 1), the mask inside its box."""

    boxes: np.ndarray
    patches: list[np.ndarray]
    iou: np.ndarray  # (N,) float32
    stability: np.ndarray  # (N,) float32
    points: np.ndarray  # (N, 2) float64 XY image pixels
    crops: np.ndarray  # (N, 4) int64 XYXY exclusive, image pixels

    @classmethod
    def empty(cls) -> "_Candidates":
        return cls(np.zeros((0, 4), np.int64), [], np.zeros(0, np.float32), np.zeros(0, np.float32),
                   np.zeros((0, 2)), np.zeros((0, 4), np.int64))

    def __len__(self) -> int:
        return len(self.patches)

    def take(self, idx: np.ndarray) -> "_Candidates":
        idx = np.asarray(idx, dtype=np.int64)
        return _Candidates(self.boxes[idx], [self.patches[i] for i in idx], self.iou[idx],
                           self.stability[idx], self.points[idx], self.crops[idx])

    @staticmethod
    def concat(parts: list["_Candidates"]) -> "_Candidates":
        parts = [p for p in parts if len(p)]
        if not parts:
            return _Candidates.empty()
        return _Candidates(np.concatenate([p.boxes for p in parts]), [q for p in parts for q in p.patches],
                           np.concatenate([p.iou for p in parts]), np.concatenate([p.stability for p in parts]),
                           np.concatenate([p.points for p in parts]), np.concatenate([p.crops for p in parts]))


def valid_low_res_size(input_size: tuple[int, int], low_res_side: int) -> tuple[int, int]:
    """The part of the (side x side) low-res logits that covers the image, not the padding.

    input_size: (h', w') of the resized image; its longest side is the encoder's input side.
    """
    h, w = input_size
    scale = low_res_side / max(h, w)
    return max(1, math.ceil(h * scale)), max(1, math.ceil(w * scale))


@dataclass(frozen=True)
class _CropFrame:
    """How one crop's low-res logits map to its pixels (SAM's post-processing, made window-able).

    SAM resizes the decoder's (n, n) logits (padded input frame) to (S, S), cuts the resized
    image's (h', w') = input_size, and resizes that to the crop's (H, W), both bilinear.
    native_valid: the part of the (n, n) logits covering the crop; rows / cols: `bilinear_taps`
    of the last resize, (h' -> H) and (w' -> W).
    """

    native_valid: tuple[int, int]
    input_size: tuple[int, int]
    rows: tuple[np.ndarray, np.ndarray, np.ndarray]
    cols: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def of(cls, emb, native_side: int, squash: bool = False) -> "_CropFrame":
        ch, cw = emb.original_size
        if squash:  # SAM 2: the low-res logits cover the whole crop and are resized straight to it
            n = native_side
            return cls((n, n), (n, n), bilinear_taps(n, ch), bilinear_taps(n, cw))
        h, w = emb.input_size
        return cls(valid_low_res_size((h, w), native_side), (h, w), bilinear_taps(h, ch), bilinear_taps(w, cw))


@torch.inference_mode()
def _process_batch(segmenter, emb, points: np.ndarray, crop_box: list[int],
                   image_size: tuple[int, int], p: AmgParams) -> _Candidates:
    """Decode one batch of single-point prompts in one crop and filter the 3 masks per point.

    points: (B, 2) XY pixels of the crop. Returns survivors with boxes/points in image pixels.
    The predicted-IoU filter and a stability pre-filter run on the decoder's own low-res logits;
    survivors are resized to the encoder's input frame (S x S, cheap), and from there to crop
    pixels: on a CPU only inside the window where their low mask can be (`_survivors_in_windows`), on a
    GPU whole, a chunk of masks per call (`_survivors_on_device`); both give the same masks, scores and boxes.
    """
    x0, y0, x1, y1 = crop_box
    _, pts, labels, _, _ = segmenter.prompt_tensors(emb, points[:, None, :], np.ones((len(points), 1)), None, None)
    native, iou_pred = segmenter.decode(emb.features, pts, labels, None, None, multimask=p.multimask_output,
                                        extras=emb.extras)
    m = iou_pred.shape[1]
    point_of = np.repeat(np.arange(len(points)), m)
    if p.use_m2m:
        # SAM 2's one-step refinement: every candidate again, its own (clamped) logits as the mask prompt
        native, iou_pred = segmenter.decode(
            emb.features, pts.repeat_interleave(m, 0), labels.repeat_interleave(m, 0), None,
            native.flatten(0, 1)[:, None].clamp(-32.0, 32.0), multimask=False, extras=emb.extras)
    low = native.flatten(0, 1).float()  # (MB, n, n), padded input frame (SAM) or the whole crop (SAM 2)
    iou = iou_pred.flatten().float()
    squash = segmenter.net.resize == "squash"
    frame = _CropFrame.of(emb, low.shape[-1], squash)

    keep = iou > p.pred_iou_thresh if p.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
    if p.stability_score_thresh > 0 and keep.any():
        lh, lw = frame.native_valid
        idx = keep.nonzero().flatten()
        coarse = stability_score(low[idx, :lh, :lw], p.mask_threshold, p.stability_score_offset)
        keep[idx] = coarse >= p.stability_score_thresh - p.stability_prefilter_margin
    idx = keep.nonzero().flatten()
    if len(idx) == 0:
        return _Candidates.empty()

    side = segmenter.image_size
    h, w = frame.input_size
    # the input-frame logits of the survivors: (n, h', w'), SAM's first resize, on survivors only (SAM 2 has none)
    mid = low[idx] if squash else \
        F.interpolate(low[idx][:, None], (side, side), mode="bilinear", align_corners=False)[:, 0, :h, :w]
    survive = _survivors_in_windows if mid.device.type == "cpu" else _survivors_on_device
    out_boxes, out_patches, out_stab, kept = survive(mid, frame, crop_box, image_size, p)
    if not out_patches:
        return _Candidates.empty()
    cand = idx.cpu().numpy()[kept]
    kept_points = points[point_of[cand]] + np.array([x0, y0])
    return _Candidates(np.stack(out_boxes), out_patches, iou.cpu().numpy()[cand].astype(np.float32),
                       np.asarray(out_stab, np.float32), kept_points.astype(np.float64),
                       np.tile(np.array(crop_box, np.int64), (len(out_patches), 1)))


def _survivors_in_windows(mid: torch.Tensor, frame: _CropFrame, crop_box: list[int], image_size: tuple[int, int],
                          p: AmgParams) -> tuple[list[np.ndarray], list[np.ndarray], list[float], list[int]]:
    """CPU: each survivor's second resize (input frame -> crop pixels) made only inside the window where its
    mask can be, in numpy. mid: (n, h', w') logits. Returns boxes (XYXY inclusive, image pixels), patches,
    stability scores and the indices (into mid) of the masks that pass the filters."""
    x0, y0 = crop_box[0], crop_box[1]
    mid = mid.numpy()
    lo_level = p.mask_threshold - p.stability_score_offset
    hi_level = p.mask_threshold + p.stability_score_offset
    image_h, image_w = image_size
    max_area = p.max_mask_fraction * image_h * image_w
    boxes, patches, stabs, kept = [], [], [], []
    for j in range(len(mid)):
        above = mid[j] > min(lo_level, p.mask_threshold)
        win = support_window(above.any(1), above.any(0), frame.rows, frame.cols)
        if win is None:
            continue
        r0, r1, c0, c1 = win
        logits = resize_window(mid[j], frame.rows, frame.cols, r0, r1, c0, c1)
        mask = logits > p.mask_threshold
        area = int(np.count_nonzero(mask))
        if area == 0 or area >= max_area:
            continue
        n_low = np.count_nonzero(logits > lo_level)  # as stability_score: |high| / |low|, 0 if empty
        stab = np.count_nonzero(logits > hi_level) / n_low if n_low else 0.0
        if p.stability_score_thresh > 0 and stab < p.stability_score_thresh:
            continue
        ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = np.array([c0 + xs[0] + x0, r0 + ys[0] + y0, c0 + xs[-1] + x0, r0 + ys[-1] + y0], np.int64)
        if near_crop_edge(torch.from_numpy(box[None]), crop_box, [0, 0, image_w, image_h], p.edge_tolerance_px)[0]:
            continue
        patches.append(mask[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1])
        boxes.append(box)
        stabs.append(float(stab))
        kept.append(j)
    return boxes, patches, stabs, kept


DEVICE_CHUNK_BYTES = 1 << 28  # full-resolution logits resized at once on a GPU (256 MiB)


def _survivors_on_device(mid: torch.Tensor, frame: _CropFrame, crop_box: list[int], image_size: tuple[int, int],
                         p: AmgParams) -> tuple[list[np.ndarray], list[np.ndarray], list[float], list[int]]:
    """GPU: the same filters as `_survivors_in_windows`, on whole resized masks, a chunk of survivors per
    call (no Python loop over candidates until the kept masks' patches are copied to the host)."""
    x0, y0 = crop_box[0], crop_box[1]
    crop_h, crop_w = len(frame.rows[0]), len(frame.cols[0])
    image_h, image_w = image_size
    max_area = p.max_mask_fraction * image_h * image_w
    chunk = max(1, DEVICE_CHUNK_BYTES // (4 * crop_h * crop_w))
    boxes, patches, stabs, kept = [], [], [], []
    for start in range(0, len(mid), chunk):
        logits = F.interpolate(mid[start:start + chunk, None], (crop_h, crop_w), mode="bilinear",
                               align_corners=False)[:, 0]
        mask = logits > p.mask_threshold
        area = mask.sum((1, 2))
        stab = stability_score(logits, p.mask_threshold, p.stability_score_offset)
        rows, cols = mask.any(2), mask.any(1)
        top, left = rows.int().argmax(1), cols.int().argmax(1)
        bottom = crop_h - 1 - rows.flip(1).int().argmax(1)
        right = crop_w - 1 - cols.flip(1).int().argmax(1)
        box = torch.stack([left + x0, top + y0, right + x0, bottom + y0], 1)
        ok = (area > 0) & (area < max_area)
        if p.stability_score_thresh > 0:
            ok &= stab >= p.stability_score_thresh
        ok &= ~near_crop_edge(box, crop_box, [0, 0, image_w, image_h], p.edge_tolerance_px).to(ok.device)
        sel = ok.nonzero().flatten()
        if len(sel) == 0:
            continue
        host_boxes = box[sel].cpu().numpy().astype(np.int64)
        for j, b in zip(sel.tolist(), host_boxes):
            patches.append(mask[j, b[1] - y0:b[3] - y0 + 1, b[0] - x0:b[2] - x0 + 1].cpu().numpy())
            boxes.append(b)
            kept.append(start + j)
        stabs.extend(stab[sel].cpu().tolist())
    return boxes, patches, stabs, kept


def _process_crop(segmenter, emb, crop_box: list[int], grid: np.ndarray,
                  image_size: tuple[int, int], p: AmgParams) -> _Candidates:
    """All prompts of one crop, then NMS within the crop ranked by predicted IoU."""
    crop_w, crop_h = crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]
    points = grid * np.array([crop_w, crop_h], dtype=np.float64)
    parts = [_process_batch(segmenter, emb, points[i:i + p.points_per_batch], crop_box, image_size, p)
             for i in range(0, len(points), p.points_per_batch)]
    cands = _Candidates.concat(parts)
    if len(cands) > 1:
        cands = cands.take(nms(cands.boxes, cands.iou, p.box_nms_thresh))
    return cands


def clean_patch(patch: np.ndarray, box: np.ndarray, image_size: tuple[int, int],
                min_area: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Fill holes and drop islands smaller than min_area in one mask given as a patch.

    patch: (y1 - y0 + 1, x1 - x0 + 1) bool; box: XYXY inclusive image pixels; image_size: (H, W).
    The outside of the box is background connected to the rest of the image, which (when the
    image's short side is >= min_area) is never a small hole, so a one-pixel border on the sides
    not at the image edge stands for it. Returns (new patch, new tight box, changed).
    """
    h, w = image_size
    x0, y0, x1, y1 = (int(v) for v in box)
    if min(h, w) >= min_area:
        top, left, bottom, right = int(y0 > 0), int(x0 > 0), int(y1 < h - 1), int(x1 < w - 1)
        work = np.pad(patch, ((top, bottom), (left, right)))
        outside = np.zeros_like(work)
        outside[:top], outside[work.shape[0] - bottom:] = True, True
        outside[:, :left], outside[:, work.shape[1] - right:] = True, True
        origin = (x0 - left, y0 - top)
    else:  # tiny image: the outside may itself be a small region, so work on the full frame
        work = np.zeros((h, w), bool)
        work[y0:y1 + 1, x0:x1 + 1] = patch
        outside, origin = None, (0, 0)
    work, filled = remove_small_regions(work, min_area, "holes", outside)
    work, dropped = remove_small_regions(work, min_area, "islands")
    if not (filled or dropped):
        return patch, np.asarray(box, np.int64), False
    rows, cols = np.flatnonzero(work.any(1)), np.flatnonzero(work.any(0))
    if len(rows) == 0:
        return work[:0, :0], np.zeros(4, np.int64), True
    new_patch = work[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    new_box = np.array([cols[0] + origin[0], rows[0] + origin[1], cols[-1] + origin[0], rows[-1] + origin[1]],
                       np.int64)
    return new_patch, new_box, True


def _postprocess_small_regions(cands: _Candidates, image_size: tuple[int, int], min_area: int,
                               nms_thresh: float) -> _Candidates:
    """Clean every mask, then NMS with unchanged masks ranked above changed ones (as SAM)."""
    if len(cands) == 0:
        return cands
    cleaned = [clean_patch(pt, bx, image_size, min_area) for pt, bx in zip(cands.patches, cands.boxes)]
    cands = _Candidates(np.stack([c[1] for c in cleaned]), [c[0] for c in cleaned], cands.iou,
                        cands.stability, cands.points, cands.crops)
    unchanged = np.array([0.0 if c[2] else 1.0 for c in cleaned], np.float32)
    nonempty = np.array([c[0].size > 0 and c[0].any() for c in cleaned])
    keep = nms(cands.boxes, unchanged, nms_thresh)
    return cands.take(keep[nonempty[keep]])


def _encode(cands: _Candidates, image_size: tuple[int, int]) -> list[AutoMask]:
    """RLE-encode each mask straight from its patch (no full-size frame is made)."""
    rles = encode_patches(cands.patches, [(int(b[0]), int(b[1])) for b in cands.boxes], image_size)
    out: list[AutoMask] = []
    for i, rle in enumerate(rles):
        x0, y0, x1, y1 = (int(v) for v in cands.boxes[i])
        cx0, cy0, cx1, cy1 = (int(v) for v in cands.crops[i])
        out.append(AutoMask(
            rle=rle, area=int(cands.patches[i].sum()),
            bbox=[float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
            predicted_iou=float(cands.iou[i]), stability_score=float(cands.stability[i]),
            point_coords=[[float(cands.points[i, 0]), float(cands.points[i, 1])]],
            crop_box=[float(cx0), float(cy0), float(cx1 - cx0), float(cy1 - cy0)]))
    return out


def _pixels_of(image: np.ndarray, box: list[int], sy: float, sx: float) -> np.ndarray:
    """The pixels of `image` under `box` (XYXY in the output frame, scaled by sy, sx into `image`); at least
    one pixel each way, however small the crop becomes."""
    x0, y0, x1, y1 = box
    h, w = image.shape[:2]
    top, left = min(round(y0 * sy), h - 1), min(round(x0 * sx), w - 1)
    return np.ascontiguousarray(image[top:max(round(y1 * sy), top + 1), left:max(round(x1 * sx), left + 1)])


def generate_masks(segmenter, image: np.ndarray, params: AmgParams = AmgParams(),
                   embedding=None, output_size: tuple[int, int] | None = None) -> list[AutoMask]:
    """SAM's automatic mask generation on one image.

    segmenter: a `model.segmenter.Segmenter` (or anything with its image_size, embed,
    prompt_tensors and decode). image: (H, W, 3) uint8 RGB. embedding: the whole image's
    `ImageEmbedding` when the caller made it already (an actor embeds a batch of images in one
    encoder call); the crops' embeddings are made here, in batched encoder calls.
    output_size: (H, W) of the original when `image` is a downscaled copy of it: the model sees `image`,
    and every mask is upsampled from its logits to the original (as SAM upsamples its 1024 px logits to
    the image it was given); crops and point grids are laid out on the original. Above
    EXACT_UPSCALE_MAX_PIXELS the masks are made in `image`'s frame and upscaled by nearest neighbour.
    Returns the masks, in pixels of the original (of `image` when output_size is None).
    """
    p = params
    h, w = output_size or image.shape[:2]
    if h * w > EXACT_UPSCALE_MAX_PIXELS and (h, w) != image.shape[:2]:
        return _upscaled(generate_masks(segmenter, image, _in_frame(p, image.shape[:2], (h, w)), embedding),
                         (h, w))
    sy, sx = image.shape[0] / h, image.shape[1] / w
    boxes, layers = crop_boxes((h, w), p.crop_n_layers, p.crop_overlap_ratio)
    grids = layer_point_grids(p.points_per_side, p.crop_n_layers, p.crop_n_points_downscale_factor)
    crops = [_pixels_of(image, box, sy, sx) for box in boxes]
    # Embed the whole image (unless given) and the crops, several per encoder call
    embeddings = [embedding] if embedding is not None else segmenter.embed(crops[:1])
    if len(crops) > 1:
        embeddings += segmenter.embed(crops[1:])
    # Each crop's logits are upsampled to the crop's size in the output frame
    embeddings = [replace(e, original_size=(y1 - y0, x1 - x0)) for e, (x0, y0, x1, y1) in zip(embeddings, boxes)]
    # Decode every crop's grid and filter, NMS within each crop
    parts = [_process_crop(segmenter, emb, crop_box, grids[layer], (h, w), p)
             for emb, crop_box, layer in zip(embeddings, boxes, layers)]
    del embeddings
    cands = _Candidates.concat(parts)
    if len(boxes) > 1 and len(cands) > 1:
        crop_area = (cands.crops[:, 2] - cands.crops[:, 0]) * (cands.crops[:, 3] - cands.crops[:, 1])
        cands = cands.take(nms(cands.boxes, 1.0 / crop_area.astype(np.float32), p.crop_nms_thresh))
    if p.min_mask_region_area > 0:
        cands = _postprocess_small_regions(cands, (h, w), p.min_mask_region_area,
                                           max(p.box_nms_thresh, p.crop_nms_thresh))
        # filling holes can grow a mask past the limit: check it again
        areas = np.array([pt.sum() for pt in cands.patches], np.int64)
        cands = cands.take(np.flatnonzero(areas < p.max_mask_fraction * h * w))
    return _encode(cands, (h, w))


def _in_frame(p: AmgParams, frame: tuple[int, int], size: tuple[int, int]) -> AmgParams:
    """`p` for masks made in `frame` that stand for an image of `size`: areas in pixels scaled down."""
    share = frame[0] * frame[1] / (size[0] * size[1])
    return replace(p, min_mask_region_area=int(round(p.min_mask_region_area * share)))


def _upscaled(masks: list[AutoMask], size: tuple[int, int]) -> list[AutoMask]:
    """Masks of a (h, w) frame -> of the (H, W) original: RLE by nearest neighbour (`upscale_rle_nearest`),
    area and box from the result, points and crop boxes scaled."""
    out = []
    for m in masks:
        h, w = m.rle["size"]
        fy, fx = size[0] / h, size[1] / w
        rle, area, box = upscale_rle_nearest(m.rle, size)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        cx, cy, cw, ch = m.crop_box
        out.append(replace(m, rle=rle, area=area, bbox=[float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
                           point_coords=[[x * fx, y * fy] for x, y in m.point_coords],
                           crop_box=[float(round(cx * fx)), float(round(cy * fy)), float(round(cw * fx)),
                                     float(round(ch * fy))]))
    return out


def generate_with_fallback(segmenter, image: np.ndarray, params: AmgParams = AmgParams(),
                           scales: tuple[float, ...] = (1.0, 0.5), embedding=None,
                           output_size: tuple[int, int] | None = None) -> tuple[list[AutoMask], float]:
    """`generate_masks`, retried at smaller scales (and half the prompt batch) when the model fails
    (RuntimeError, e.g. out of memory; MemoryError). embedding: the whole image's, used at scale 1;
    output_size: the original's (H, W) when `image` is a downscaled copy. Returns (masks in pixels of the
    original, scale of `image` used); re-raises the last failure when every scale fails."""
    h, w = image.shape[:2]
    out = output_size or (h, w)
    error: BaseException | None = None
    for attempt, scale in enumerate(scales):
        try:
            if scale == 1.0:
                return generate_masks(segmenter, image, params, embedding, out), 1.0
            small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
            smaller = replace(params, points_per_batch=max(1, params.points_per_batch >> attempt))
            return generate_masks(segmenter, small, smaller, output_size=out), scale
        except (RuntimeError, MemoryError) as e:
            error = e
    assert error is not None
    raise error


def device_points_per_batch(segmenter, requested: int, memory_share: float = 0.25, most: int = 1024) -> int:
    """Prompts to decode at once: `requested` on a CPU; on a GPU as many as `memory_share` of its free memory
    holds (each prompt's decoder pass carries copies of the image embedding), at least `requested`, at most
    `most`, in multiples of 64."""
    if segmenter.device.type != "cuda":
        return requested
    free, _ = torch.cuda.mem_get_info(segmenter.device)
    side = int(segmenter.net.embed_size)
    channels = int(segmenter.net.prompt_dim)
    per_prompt = 8 * channels * side * side * 4  # ~8 fp32 copies of the embedding in the two-way transformer
    fits = int(free * memory_share // per_prompt) // 64 * 64
    return int(max(requested, min(most, fits)))


def to_records(masks: list[AutoMask], image_id: str, round: int,
               model_version: str | None) -> list[MaskRecord]:
    """Generated masks -> `MaskRecord`s (stage and origin "auto"). Mask ids are deterministic in
    (image, round, model version, index), so a rerun writes the same ids."""
    records = []
    for i, m in enumerate(masks):
        records.append(MaskRecord.from_rle(
            image_id, make_mask_id(image_id, "auto", round, model_version, i), m.rle, "auto", round, origin="auto",
            model_version=model_version, predicted_iou=m.predicted_iou,
            stability_score=m.stability_score, point_coords=m.point_coords, crop_box=m.crop_box))
    return records
