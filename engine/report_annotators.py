"""The report's per-annotator section: what each person (or simulated annotator) drew, at what cost, and how well.

Quality is measured against known masks two ways: where the run has ground truth for its images
(`images.ground_truth`, simulations), each of an annotator's masks is matched to the true object it overlaps most
and its IoU averaged; and on gold tasks (`stages.manual.gold_share`: holdout images mixed into the manual rounds,
what works for people), from the manual stage's scores in the ledger.
"""
from __future__ import annotations

import logging

import numpy as np
from pycocotools import mask as mask_utils

from engine.integrations import agreement, runtime
from engine.report_format import _fmt, _table

log = logging.getLogger(__name__)

HUMAN_STAGES = ("manual", "semi")  # a review edits these stages' records in place


def gold_by_annotator(ledger) -> dict[str, dict]:
    """The manual rounds' gold scores per annotator, pooled: masks, mean IoU (weighted by masks), recall."""
    pooled: dict[str, dict] = {}
    for e in ledger.entries() if ledger is not None else []:
        gold = ((e.get("outputs") or {}).get("gold") or {}) if e.get("status") == "done" else {}
        for who, g in (gold.get("by_annotator") or {}).items():
            p = pooled.setdefault(who, {"masks": 0, "iou_sum": 0.0, "recalls": []})
            p["masks"] += g["masks"]
            p["iou_sum"] += (g["iou"] or 0.0) * g["masks"]
            if g.get("recall_50") is not None:
                p["recalls"].append(g["recall_50"])
    return {who: {"gold_masks": p["masks"], "gold_iou": p["iou_sum"] / p["masks"] if p["masks"] else None,
                  "gold_recall_50": float(np.mean(p["recalls"])) if p["recalls"] else None}
            for who, p in pooled.items()}


def annotator_rows(cfg, store, ledger=None) -> list[dict]:
    """One row per annotator: masks, images, clicks / mask, s / mask, and where ground truth exists the mean IoU
    of their masks to the best-matching true object (`truth_iou`) and the share of masks at IoU ≥ 0.75."""
    columns = ["image_id", "annotator", "stage", "clicks", "lead_time_s", "rle", "height", "width"]
    if not store.shards():
        return []
    # The human stages' rows only: the automatic stage's masks, most of the store, are never read here
    table = store.read_table(columns=columns, stage=list(HUMAN_STAGES)).to_pylist()
    rows = [r for r in table if r["annotator"]]
    gold = gold_by_annotator(ledger)
    agreed = agreement.by_annotator(cfg.workdir)
    if not rows and not gold and not agreed:
        return []
    truth = _truth(cfg, {r["image_id"] for r in rows})
    ious = _best_ious(rows, truth) if truth else {}
    out = []
    for who in sorted({r["annotator"] for r in rows} | set(gold) | set(agreed)):
        mine = [(k, r) for k, r in enumerate(rows) if r["annotator"] == who]
        clicks = [r["clicks"] for _, r in mine if r["clicks"] is not None]
        seconds = [r["lead_time_s"] for _, r in mine if r["lead_time_s"] is not None]
        scored = [ious[k] for k, _ in mine if k in ious]
        out.append({"annotator": who, "masks": len(mine), "images": len({r["image_id"] for _, r in mine}),
                    "clicks_per_mask": float(np.mean(clicks)) if clicks else None,
                    "seconds_per_mask": float(np.mean(seconds)) if seconds else None,
                    "scored_masks": len(scored),
                    "truth_iou": float(np.mean(scored)) if scored else None,
                    "share_iou_75": float(np.mean(np.asarray(scored) >= 0.75)) if scored else None,
                    **gold.get(who, {"gold_masks": 0, "gold_iou": None, "gold_recall_50": None}),
                    **agreed.get(who, {"double_tasks": 0, "agreement": None})})
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
    rows = annotator_rows(inp.cfg, inp.store, inp.ledger)
    if not rows:
        return []
    md = ["## Annotators", "",
          "Masks each annotator drew or confirmed (manual and semi-automatic stages), clicks and seconds per "
          "mask as Label Studio recorded them" + (", and the mean IoU of their masks to the ground-truth object "
                                                  "each overlaps most (every annotated image has known masks "
                                                  "here: `images.ground_truth`)" if inp.cfg.images.ground_truth
                                                  else "; no ground truth in this run, so no quality column") + ".",
          "Gold columns: masks drawn on gold tasks (holdout images mixed into the manual rounds, "
          "`stages.manual.gold_share`; never stored), their mean IoU to the known masks and the share of known "
          "objects drawn at IoU ≥ 0.5. Agreement: on tasks two people drew (`stages.manual.double_share`), each "
          "mask's IoU to the other person's mask it overlaps most, averaged (1: they drew the same masks).", ""]
    md += _table(["annotator", "masks", "images", "clicks / mask", "s / mask", "IoU to truth", "share IoU ≥ 0.75",
                  "gold masks", "IoU on gold", "gold recall@0.5", "double tasks", "agreement"],
                 [[r["annotator"], _fmt(r["masks"]), _fmt(r["images"]), _fmt(r["clicks_per_mask"], 1),
                   _fmt(r["seconds_per_mask"], 1), _fmt(r["truth_iou"], 3), _fmt(r["share_iou_75"], 3),
                   _fmt(r["gold_masks"]), _fmt(r["gold_iou"], 3), _fmt(r["gold_recall_50"], 3),
                   _fmt(r["double_tasks"]), _fmt(r["agreement"], 3)]
                  for r in rows])
    return md + [""]
