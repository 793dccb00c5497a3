"""The report's per-annotator section: what each person (or simulated annotator) drew, at what cost, and how well.

Quality is measured against known masks where the run has them (`images.ground_truth`: every annotated image is
then a gold image): each of an annotator's masks is matched to the ground-truth object it overlaps most, and its
IoU to it is averaged. Runs without ground truth show the counts and costs only.
"""
from __future__ import annotations

import logging

import numpy as np
from pycocotools import mask as mask_utils

from engine.integrations import runtime

log = logging.getLogger(__name__)

HUMAN_STAGES = ("manual", "semi")  # a review edits these stages' records in place


def annotator_rows(cfg, store) -> list[dict]:
    """One row per annotator: masks, images, clicks / mask, s / mask, and where ground truth exists the mean IoU
    of their masks to the best-matching true object (`truth_iou`) and the share of masks at IoU ≥ 0.75."""
    columns = ["image_id", "annotator", "stage", "clicks", "lead_time_s", "rle", "height", "width"]
    if not store.shards():
        return []
    table = store.read_table(columns=columns).to_pylist()
    rows = [r for r in table if r["annotator"] and r["stage"] in HUMAN_STAGES]
    if not rows:
        return []
    truth = _truth(cfg, {r["image_id"] for r in rows})
    ious = _best_ious(rows, truth) if truth else {}
    out = []
    for who in sorted({r["annotator"] for r in rows}):
        mine = [(k, r) for k, r in enumerate(rows) if r["annotator"] == who]
        clicks = [r["clicks"] for _, r in mine if r["clicks"] is not None]
        seconds = [r["lead_time_s"] for _, r in mine if r["lead_time_s"] is not None]
        scored = [ious[k] for k, _ in mine if k in ious]
        out.append({"annotator": who, "masks": len(mine), "images": len({r["image_id"] for _, r in mine}),
                    "clicks_per_mask": float(np.mean(clicks)) if clicks else None,
                    "seconds_per_mask": float(np.mean(seconds)) if seconds else None,
                    "scored_masks": len(scored),
                    "truth_iou": float(np.mean(scored)) if scored else None,
                    "share_iou_75": float(np.mean(np.asarray(scored) >= 0.75)) if scored else None})
    return out


def _truth(cfg, image_ids: set[str]) -> dict[str, list]:
    if not cfg.images.ground_truth:
        return {}
    try:
        truth = runtime.ground_truth(cfg, "the per-annotator quality")
    except Exception as e:  # the report goes on without the quality columns
        log.warning("report: per-annotator quality left out (%s)", " ".join(str(e).split())[:200])
        return {}
    return {i: objs for i, objs in truth.items() if i in image_ids}


def _best_ious(rows: list[dict], truth: dict[str, list]) -> dict[int, float]:
    """Row index -> IoU of that mask to the true object of its image it overlaps most (whole objects and parts)."""
    out: dict[int, float] = {}
    by_image: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        if truth.get(r["image_id"]):
            by_image.setdefault(r["image_id"], []).append(k)
    for image_id, ks in by_image.items():
        gt = mask_utils.encode(np.asfortranarray(np.stack([o.mask for o in truth[image_id]]).transpose(1, 2, 0)
                                                 .astype(np.uint8)))
        dt = [{"size": [rows[k]["height"], rows[k]["width"]], "counts": rows[k]["rle"]} for k in ks]
        iou = np.asarray(mask_utils.iou(dt, gt, [0] * len(gt)))
        for k, best in zip(ks, iou.reshape(len(ks), len(gt)).max(axis=1)):
            out[k] = float(best)
    return out


def annotator_section(inp) -> list[str]:
    """## Annotators: a row per person; quality against ground truth where the run has it."""
    from engine.report import _fmt, _table

    rows = annotator_rows(inp.cfg, inp.store)
    if not rows:
        return []
    md = ["## Annotators", "",
          "Masks each annotator drew or confirmed (manual and semi-automatic stages), clicks and seconds per "
          "mask as Label Studio recorded them" + (", and the mean IoU of their masks to the ground-truth object "
                                                  "each overlaps most (every annotated image has known masks "
                                                  "here: `images.ground_truth`)" if inp.cfg.images.ground_truth
                                                  else "; no ground truth in this run, so no quality column") + ".",
          ""]
    md += _table(["annotator", "masks", "images", "clicks / mask", "s / mask", "IoU to truth", "share IoU ≥ 0.75"],
                 [[r["annotator"], _fmt(r["masks"]), _fmt(r["images"]), _fmt(r["clicks_per_mask"], 1),
                   _fmt(r["seconds_per_mask"], 1), _fmt(r["truth_iou"], 3), _fmt(r["share_iou_75"], 3)]
                  for r in rows])
    return md + [""]
