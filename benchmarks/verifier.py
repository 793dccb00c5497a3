"""Benchmark: the learned mask verifier (model/verifier.py) against today's triage, at the same review budget.

Setting. The compact model trained here (benchmarks/scaleout.py's, `--train-steps`, cached) generates
candidates with loose filters (16 x 16 grid, NMS 0.7) on synthetic scenes; a candidate is right when its IoU
to the best ground-truth mask is >= `--precision-iou` (default 0.5: the few-minute CPU model's masks rarely reach
the engine's 0.9 — 7 of 611 candidates reached even 0.75 after 600 steps — so at 0.9 there is nothing to triage;
with real SAM weights run it at 0.9).
Round 0's images are the first history; each round r = 1..R learns from the decisions of rounds < r (as the
engine would, from the people's accept / reject decisions) and triages round r's candidates:
    iou       today's: (pred_iou, stability) thresholds chosen on the history by model/calibration.py
              `choose_thresholds` at the target precision (0.9, 90 % Wilson bound); review ranked by pred_iou
    verifier  `MaskVerifier` fitted on the history's features and decisions, as the engine does it
              (model/calibration.py `fit_verifier`: promoted only when it ranks held-out decisions better than the
              predicted IoU, else the thresholds decide); its score threshold chosen by the same rule
              (`loosest_threshold`); review ranked by the score
    both      accepted only when both accept; review ranked by the verifier's score
Each method auto-accepts what passes, sends the next `--review-share` of the round's candidates (the same
number for every method) to people, who keep the right ones, and drops the rest. Per round: precision and recall
of the accepted masks (auto + reviewed-and-right) against every right candidate, and of the auto-accepted alone.
Exhaustivity: per image, 1 - `uncovered_objectness` (object-like: the verifier's P(right) >= 0.3) of the verifier's
kept masks against "complete" (>= 80 % of the ground truth's area covered by them): `exhaustivity_auc`. And the
semi stage's `stages.semi.complete_below` decision (`--complete-below`): images whose auto-accepted masks leave at
most that share uncovered skip people — `judged_complete_share` of the images, the precision of their masks, and
the truth's area their right masks cover there (`judged_complete_coverage`) against the other images'.

Last line: JSON with precision_at_budget_iou / _verifier / _both, recall_at_budget_*, auto_precision_*,
review_share, exhaustivity_auc, judged_complete_*, and the sizes (means over rounds; the per-round table first).

    python benchmarks/verifier.py [--rounds 3] [--images 8] [--size 256] [--review-share 0.1] [--train-steps 600]
                                  [--precision-iou 0.5] [--complete-below 0.05]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scaleout import trained_model  # noqa: E402
from engine.integrations.synth import make_scene, scene_rng  # noqa: E402
from model.amg import AmgParams, generate_masks  # noqa: E402
from model.calibration import (CalibrationSamples, CalibrationSettings, best_match_iou,  # noqa: E402
                               choose_thresholds, fit_verifier)
from model.segmenter import Segmenter  # noqa: E402
from model.verifier import auc, mask_features, triage_at_budget, uncovered_objectness  # noqa: E402
from storage.rle import decode_rles, encode_masks  # noqa: E402

TARGET = 0.9


def round_candidates(seg: Segmenter, round_no: int, n_images: int, size: int, params: AmgParams) -> list[dict]:
    """Per image of round `round_no`: its candidates' RLEs, scores, features, best IoU to the truth, truth RLEs."""
    out = []
    for i in range(n_images):
        image, truth, _ = make_scene(scene_rng(500 + round_no, i), size)
        masks = generate_masks(seg, image, params)
        rles = [m.rle for m in masks]
        pred = np.array([m.predicted_iou for m in masks])
        stab = np.array([m.stability_score for m in masks])
        truth_rles = encode_masks(truth)
        out.append({"rles": rles, "pred": pred, "stab": stab, "features": mask_features(image, rles, pred, stab),
                    "best": best_match_iou(rles, truth_rles), "truth": truth_rles})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--review-share", type=float, default=0.1)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--precision-iou", type=float, default=0.5)
    ap.add_argument("--complete-below", type=float, default=0.05)
    args = ap.parse_args()
    precision_iou = args.precision_iou
    torch.set_num_threads(2)
    seg = Segmenter.load(trained_model(args.train_steps))
    params = AmgParams(points_per_side=args.points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                       box_nms_thresh=0.7, min_mask_region_area=0)
    rounds = [round_candidates(seg, r, args.images, args.size, params) for r in range(args.rounds + 1)]
    rows, exh_scores, exh_labels, images_seen = [], [], [], []
    for r in range(1, args.rounds + 1):
        hist = [im for past in rounds[:r] for im in past]
        h_feat = np.concatenate([im["features"] for im in hist])
        h_good = np.concatenate([im["best"] for im in hist]) >= precision_iou
        thresholds = choose_thresholds(CalibrationSamples(h_feat[:, 0], h_feat[:, 1],
                                                          np.concatenate([im["best"] for im in hist])),
                                       TARGET, precision_iou, 0.88, 0.95, min_samples=20, min_kept=5, confidence=0.9)
        samples = CalibrationSamples(h_feat[:, 0], h_feat[:, 1], np.concatenate([im["best"] for im in hist]),
                                     features=h_feat)
        # the engine's own path (model/calibration.py fit_verifier): promoted only when it beats the predicted
        # IoU on held-out decisions, else the thresholds decide
        verifier, info = fit_verifier(samples, CalibrationSettings(TARGET, precision_iou, 0.88, 0.95, min_samples=20,
                                                                   min_kept=5, confidence=0.9))
        v_thresh, v_reached = (info["threshold"], info["reached"]) if verifier else (None, False)
        now = rounds[r]
        feat = np.concatenate([im["features"] for im in now])
        good = np.concatenate([im["best"] for im in now]) >= precision_iou
        budget = int(round(args.review_share * len(good)))
        by_iou = (feat[:, 0] >= thresholds.pred_iou_thresh) & (feat[:, 1] >= thresholds.stability_score_thresh)
        score = verifier.score(feat) if verifier else feat[:, 0]
        by_ver = score >= v_thresh if verifier else by_iou
        result = {"iou": triage_at_budget(by_iou, feat[:, 0], good, budget),
                  "verifier": triage_at_budget(by_ver, score, good, budget),
                  "both": triage_at_budget(by_iou & by_ver, score, good, budget)}
        row = {"round": r, "candidates": len(good), "right": int(good.sum()), "review_budget": budget,
               "iou_reached": thresholds.reached, "verifier_reached": v_reached, "verifier_promoted": bool(verifier),
               "held_out_auc": info["held_out_auc"], "pred_iou_auc": info["pred_iou_auc"]}
        for name, res in result.items():
            row.update({f"precision_{name}": round(res["precision"], 3), f"recall_{name}": round(res["recall"], 3),
                        f"auto_precision_{name}": None if res["auto_precision"] is None else
                        round(res["auto_precision"], 3), f"auto_accepted_{name}": res["auto_accepted"]})
        rows.append(row)
        # Exhaustivity per image: the verifier's kept masks against the truth's area; and the semi stage's
        # `complete_below` decision on its auto-accepted masks alone (such an image skips people)
        start = 0
        for im in now:
            n = len(im["rles"])
            sl = slice(start, start + n)
            start += n
            objectness = verifier.score(im["features"]) if verifier else im["pred"]
            truth = decode_rles(im["truth"]).any(axis=0)

            def coverage(kept: np.ndarray) -> float:
                got = decode_rles([x for x, k in zip(im["rles"], kept) if k]).any(axis=0) if kept.any() else \
                    np.zeros_like(truth)
                return float((truth & got).sum() / max(truth.sum(), 1))

            final = result["verifier"]["final"][sl]
            exh_labels.append(coverage(final) >= 0.8)
            exh_scores.append(1.0 - uncovered_objectness(im["rles"], objectness, final))
            auto = by_ver[sl]
            judged_complete = auto.any() and uncovered_objectness(im["rles"], objectness, auto) <= args.complete_below
            images_seen.append({"complete": bool(judged_complete), "coverage": coverage(auto & good[sl]),
                                "right": int(good[sl][auto].sum()), "accepted": int(auto.sum())})
    print("| round | candidates | right | review | precision iou / verifier / both | recall iou / verifier / both |"
          " auto-precision iou / verifier / both |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['candidates']} | {row['right']} | {row['review_budget']} | "
              f"{row['precision_iou']} / {row['precision_verifier']} / {row['precision_both']} | "
              f"{row['recall_iou']} / {row['recall_verifier']} / {row['recall_both']} | "
              f"{row['auto_precision_iou']} / {row['auto_precision_verifier']} / {row['auto_precision_both']} |")

    def mean(key: str) -> float | None:
        vals = [row[key] for row in rows if row[key] is not None]
        return round(float(np.mean(vals)), 3) if vals else None

    exh = auc(np.array(exh_scores), np.array(exh_labels))
    done = [im for im in images_seen if im["complete"]]
    rest = [im for im in images_seen if not im["complete"]]
    print(json.dumps({
        "precision_at_budget_iou": mean("precision_iou"), "precision_at_budget_verifier": mean("precision_verifier"),
        "precision_at_budget_both": mean("precision_both"), "recall_at_budget_iou": mean("recall_iou"),
        "recall_at_budget_verifier": mean("recall_verifier"), "recall_at_budget_both": mean("recall_both"),
        "auto_precision_iou": mean("auto_precision_iou"), "auto_precision_verifier": mean("auto_precision_verifier"),
        "verifier_promoted_rounds": sum(r["verifier_promoted"] for r in rows),
        "held_out_auc": mean("held_out_auc"), "pred_iou_auc": mean("pred_iou_auc"),
        "review_share": args.review_share, "exhaustivity_auc": None if exh is None else round(exh, 3),
        "complete_images": int(np.sum(exh_labels)), "images": len(exh_labels), "rounds": args.rounds,
        "complete_below": args.complete_below, "judged_complete_share": round(len(done) / len(images_seen), 3),
        "judged_complete_precision": round(sum(im["right"] for im in done) / max(1, sum(im["accepted"] for im in done)),
                                           3) if done else None,
        "judged_complete_coverage": round(float(np.mean([im["coverage"] for im in done])), 3) if done else None,
        "other_images_coverage": round(float(np.mean([im["coverage"] for im in rest])), 3) if rest else None,
        "images_per_round": args.images, "size": args.size, "train_steps": args.train_steps,
        "right_at_iou": precision_iou, "target_precision": TARGET}))


if __name__ == "__main__":
    main()
