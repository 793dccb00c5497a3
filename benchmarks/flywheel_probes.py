"""The measurements behind docs/experiments/flywheel.md's choices (issue 23), three probes:

  gap          a model trained on "shapes" scenes only, scored on a "pebbles" and a "shapes" holdout, then
               fine-tuned on pebbles ground truth with and without replay of the shapes set;
  signals      per-image doubt signals of a model (model/uncertainty.py) against that image's 1-click error on
               unseen pebbles scenes: rank correlations;
  calibration  on a finished flywheel/demo work dir: the automatic stage's recall/precision against ground
               truth under several calibration settings, with the final model and the same images;
  clicks       on a finished work dir: which corrective clicks lower the IoU, and whether feeding the previous
               mask (SAM's loop) or choosing among 3 masks at every click changes that.

Last line of each: one JSON object with the figures.

    .venv/bin/python benchmarks/flywheel_probes.py gap --base benchmarks/.cache/amg-compact-3min-seed0
    .venv/bin/python benchmarks/flywheel_probes.py signals --checkpoint benchmarks/.cache/amg-compact-3min-seed0
    .venv/bin/python benchmarks/flywheel_probes.py calibration --workdir /tmp/fw-random
    .venv/bin/python benchmarks/flywheel_probes.py clicks --workdir /tmp/fw-random
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.integrations import runtime  # noqa: E402
from engine.integrations.config import load_config  # noqa: E402
from engine.integrations.synth import make_scene, scene_rng, write_synthetic_dataset  # noqa: E402
from model.amg import generate_masks  # noqa: E402
from model.calibration import (CalibrationSamples, best_match_iou, choose_thresholds,  # noqa: E402
                               history_images, on_verified)
from model.evaluate import click_eval, evaluate_checkpoint, load_coco_folder, match_rates  # noqa: E402
from model.segmenter import Segmenter  # noqa: E402
from model.train import TrainSettings, dataset_sampler, train  # noqa: E402
from model.uncertainty import image_uncertainty  # noqa: E402
from storage.rle import decode_rles  # noqa: E402


def _rank_corr(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def gap(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sa-gap-"))
    for name, family, seed, n in (("hold-pebbles", "pebbles", 1, 12), ("hold-shapes", "shapes", 1, 12),
                                  ("train-pebbles", "pebbles", 0, 18), ("boot", "shapes", 1000, 96)):
        write_synthetic_dataset(work / name, n, seed, 256, family=family)

    def score(checkpoint):
        return {h: round(evaluate_checkpoint(str(checkpoint), str(work / f"hold-{h}" / "images"),
                                             str(work / f"hold-{h}" / "annotations.json"), clicks=(1,),
                                             amg_points_per_side=None)["miou@1"], 3) for h in ("pebbles", "shapes")}

    out = {"base": score(args.base)}
    _, pi, pm, _ = load_coco_folder(str(work / "train-pebbles"))
    _, bi, bm, _ = load_coco_folder(str(work / "boot"))
    for variant in ("replay", "no_replay"):
        seg = Segmenter.load(args.base)
        if variant == "replay":
            data = dataset_sampler(pi + bi, pm + bm, [np.full(len(m), 2.0, np.float32) for m in pm]
                                   + [np.ones(len(m), np.float32) for m in bm])
        else:
            data = dataset_sampler(pi, pm)
        result = train(seg, data, TrainSettings(minutes=args.minutes, seed=1, threads=args.threads, lr=2e-3))
        seg.save(work / variant, {})
        out[variant] = {**score(work / variant), "steps": result.steps}
        print(variant, out[variant], flush=True)
    return out


def signals(args) -> dict:
    torch.set_num_threads(args.threads)
    seg = Segmenter.load(args.checkpoint)
    rows = []
    for i in range(args.images):
        image, masks, _ = make_scene(scene_rng(9, i), 256, "pebbles")
        u = image_uncertainty(seg, image)
        error = 1 - click_eval(seg, [image], [masks], clicks=1)["clicks@1"]
        rows.append((u["instability"], u["low_confidence"], u["disagreement"], error))
    r = np.array(rows)
    return {name: round(_rank_corr(r[:, k], r[:, 3]), 3)
            for k, name in enumerate(("instability", "low_confidence", "disagreement"))}


def calibration(args) -> dict:
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    cfg = load_config(workdir / "engine.yaml")
    ledger = {json.loads(line)["step"]: json.loads(line) for line in (workdir / "ledger.jsonl").read_text().splitlines()}
    auto = next(s for s in ledger if s.endswith(".auto"))
    checkpoint, round_no = ledger[auto]["inputs"]["checkpoint"], ledger[auto]["round"]
    ids = ledger[f"r{round_no}.select"]["outputs"]["image_ids"]
    seg, store, source = runtime.segmenter(cfg, checkpoint), runtime.mask_store(cfg), runtime.image_source(cfg)
    loose = runtime.calibration_params(cfg)
    truth_objects = runtime.ground_truth(cfg)
    truth = {i: np.stack([o.mask for o in truth_objects[i]]) for i in ids if truth_objects.get(i)}
    generated = {i: generate_masks(seg, source.load(source.ref(i)).pixels, loose) for i in ids}

    history, coverage = [], []
    for image_id in history_images(store, round_no, 16):
        verified = [r.rle for r in store.iter_records(image_ids=[image_id], verified=True, round=(0, round_no - 1))]
        masks = generate_masks(seg, source.load(source.ref(image_id)).pixels, loose)
        if not masks:
            continue
        history.append(CalibrationSamples(np.array([m.predicted_iou for m in masks]),
                                          np.array([m.stability_score for m in masks]),
                                          best_match_iou([m.rle for m in masks], verified)))
        coverage.append(on_verified([m.rle for m in masks], verified, 0.5))
    samples, judged = CalibrationSamples.concat(history), np.concatenate(coverage)
    out = []
    for only_on_verified in (False, True):
        s = samples if not only_on_verified else CalibrationSamples(
            samples.pred_iou[judged], samples.stability[judged], samples.best_iou[judged])
        for target, iou in ((0.9, 0.9), (0.8, 0.5), (0.8, 0.75)):
            th = choose_thresholds(s, target, iou, 0.92, 0.95)
            pred = {}
            for i in ids:
                kept = [m for m in generated[i]
                        if m.predicted_iou >= th.pred_iou_thresh and m.stability_score >= th.stability_score_thresh]
                pred[i] = decode_rles([m.rle for m in kept]) if kept else np.zeros((0, 1, 1), bool)
            rates = match_rates({i: p for i, p in pred.items() if len(p)}, truth)
            row = {"only_on_verified": only_on_verified, "target": target, "precision_iou": iou,
                   "pred_iou_thresh": round(th.pred_iou_thresh, 3), "stability": round(th.stability_score_thresh, 3),
                   "recall_50": rates["recall_50"], "precision_50": rates["precision_50"]}
            print(row, flush=True)
            out.append(row)
    return {"settings": out}


def clicks(args) -> dict:
    """Why do some corrective clicks lower the IoU? The simulated annotator's protocol (model/clicks.py, up to 10
    clicks, stop at IoU 0.9) on the pebbles holdout with a finished run's final model, each click sequence run
    three ways: as our ML backend answers (click 1: best of 3 masks; later clicks: one mask, fed the previous
    low-res logits), without the previous logits, and choosing the best of 3 at every click. Per corrective
    click: did it lower the IoU, its label, the depth (px) of the error region it was put in, the object's area."""
    from model.clicks import first_click, interior_distance, next_click
    from model.iou import mask_iou

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    cfg = load_config(workdir / "engine.yaml")
    checkpoint = runtime.current_model(cfg) or args.checkpoint
    seg = runtime.segmenter(cfg, checkpoint)
    _, images, masks, _ = load_coco_folder(str(workdir / "synth-holdout"))
    ways = {"backend": dict(feed=True, multi=False), "no_logits": dict(feed=False, multi=False),
            "best_of_3": dict(feed=True, multi=True)}
    out = {}
    for way, how in ways.items():
        rows, finals, counts = [], [], []
        for image, objects in zip(images, masks):
            emb = seg.embed([image])[0]
            for gt in objects[: args.objects]:
                x, y = first_click(gt)
                pts, labs, prev, best = [(x, y)], [1], None, 0.0
                history = []
                for k in range(10):
                    kw = {"points": np.array([pts], np.float32), "labels": np.array([labs], np.int64)}
                    if how["feed"] and prev is not None:
                        kw["mask_input"] = prev[None, None]
                    pred = seg.predict(emb, multimask=(k == 0) or how["multi"], upsample=False, **kw)
                    i = int(pred.iou_pred[0].argmax())
                    prev = pred.low_res_logits[0, i].numpy()
                    mask = (seg.upsample_logits(pred.low_res_logits[0, i][None], emb)[0] > 0).numpy()
                    iou = float(mask_iou(mask, gt))
                    if history:
                        rows.append({"hurt": iou < history[-1], "label": labs[-1], "depth": depth,
                                     "area": int(gt.sum()), "k": k})
                    history.append(iou)
                    if iou >= 0.9:
                        break
                    click = next_click(mask, gt)
                    if click is None:
                        break
                    err = (gt & ~mask) if click[2] else (mask & ~gt)
                    depth = float(interior_distance(err)[click[1], click[0]])
                    pts.append(click[:2])
                    labs.append(click[2])
                finals.append(max(history))
                counts.append(len(history))
        hurt = np.array([r["hurt"] for r in rows])
        neg = np.array([r["label"] == 0 for r in rows])
        shallow = np.array([r["depth"] <= 2.0 for r in rows])
        out[way] = {"corrective_clicks": len(rows), "hurt_share": round(float(hurt.mean()), 3),
                    "hurt_share_negative": round(float(hurt[neg].mean()), 3) if neg.any() else None,
                    "hurt_share_positive": round(float(hurt[~neg].mean()), 3) if (~neg).any() else None,
                    "hurt_share_depth_le_2px": round(float(hurt[shallow].mean()), 3) if shallow.any() else None,
                    "hurt_share_depth_gt_2px": round(float(hurt[~shallow].mean()), 3) if (~shallow).any() else None,
                    "share_depth_le_2px": round(float(shallow.mean()), 3),
                    "clicks_per_object": round(float(np.mean(counts)), 2),
                    "best_iou": round(float(np.mean(finals)), 4), "objects": len(finals)}
        print(way, out[way], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="probe", required=True)
    g = sub.add_parser("gap")
    g.add_argument("--base", required=True, help="a checkpoint trained on shapes scenes")
    g.add_argument("--minutes", type=float, default=4.5)
    s = sub.add_parser("signals")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--images", type=int, default=20)
    c = sub.add_parser("calibration")
    c.add_argument("--workdir", required=True, help="a finished demo / benchmarks/flywheel.py work dir")
    k = sub.add_parser("clicks")
    k.add_argument("--workdir", required=True, help="a finished demo / benchmarks/flywheel.py work dir")
    k.add_argument("--checkpoint", default=None, help="the model (default: the run's model in use)")
    k.add_argument("--objects", type=int, default=100, help="at most this many objects per image")
    for p in (g, s, c, k):
        p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    probes = {"gap": gap, "signals": signals, "calibration": calibration, "clicks": clicks}
    print(json.dumps({"probe": args.probe, **probes[args.probe](args)}))


if __name__ == "__main__":
    main()
