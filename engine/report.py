"""The report: what each round and stage produced, and how the model and the annotators' cost moved.

Built from the round ledger (decisions, evaluations, stage summaries, timings) and the mask shards
(counts, clicks and seconds per mask, scores, the masks themselves). Writes `report.md` and PNG plots
(matplotlib, Agg) into one folder:

    miou_by_round.png      holdout mIoU at 1/3/5 clicks of the model in use after each round (+ rejected candidates)
    annotation_cost.png    clicks and seconds per mask, per manual/semi round
    masks_per_image.png    masks per image, per round, coloured by stage
    scores.png             predicted IoU and stability score of model-made masks
    gallery.png            images with their masks overlaid
"""
from __future__ import annotations

import json
from dataclasses import dataclass
import math
from pathlib import Path

import pandas as pd

from engine.integrations import runtime
from engine.integrations.config import EngineConfig
from engine.rounds import LEDGER_FILE, Ledger, metric_label, metric_scores
from model.evaluate import EVAL_PRED_IOU_THRESH, EVAL_STABILITY_SCORE_THRESH
from storage.coco import read_coco
from engine.report_annotators import annotator_section
from engine.report_format import _fmt, _table  # noqa: F401  (the report's cells; tests import them from here)
from engine.report_plots import (_overlay, plot_cost, plot_gallery, plot_masks_per_image, plot_miou,  # noqa: F401
                                 plot_scores)

STAGE_TITLES = {"manual": "Assisted-manual", "semi": "Semi-automatic", "auto": "Fully automatic"}
MASK_COLUMNS = ["image_id", "stage", "origin", "round", "verified", "clicks", "lead_time_s", "predicted_iou",
                "stability_score", "area"]


class ReportError(RuntimeError):
    """The report can't be built (no ledger, unreadable store); one line naming the thing."""


# --- gathering -----------------------------------------------------------------------------------

def _mask_table(cfg: EngineConfig):
    """All committed masks' light columns as a pandas DataFrame (no RLE), or an empty one."""
    store = runtime.mask_store(cfg)
    if not store.shards():
        return store, pd.DataFrame(columns=MASK_COLUMNS)
    return store, store.read_table(columns=MASK_COLUMNS).to_pandas()


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def round_rows(ledger: Ledger, masks, metric_keys: list[str]) -> list[dict]:
    """One row per round: stage, images, masks, masks/image, clicks/mask, s/mask, candidate eval, decision.

    Counts come from the shards (what was committed); clicks and seconds per mask from the shards'
    `clicks` / `lead_time_s` columns, falling back to the stage summary in the ledger.
    """
    rows = []
    rounds = sorted({e["round"] for e in ledger.entries() if e["kind"] == "select"})
    if not rounds and len(masks):  # no round loop (stage-only runs): one row per (stage, round) in the store
        for (stage, r), mine in masks.groupby(["stage", "round"], sort=True):
            images = int(mine["image_id"].nunique())
            rows.append({"round": int(r), "stage": stage, "status": "done", "images": images, "masks": len(mine),
                         "masks_per_image": len(mine) / images if images else None,
                         "clicks_per_mask": _mean(mine["clicks"].tolist()),
                         "seconds_per_mask": _mean(mine["lead_time_s"].tolist()), "stage_seconds": None,
                         "eval": {k: None for k in metric_keys}, "promoted": None, "reason": None})
        return rows
    for r in rounds:
        sel = ledger.get(f"r{r}.select")
        stage = (sel.get("inputs") or {}).get("stage")
        stage_rec = ledger.get(f"r{r}.{stage}") or {}
        summary = stage_rec.get("outputs") or {}
        selected = len((sel.get("outputs") or {}).get("image_ids", []))
        mine = masks[(masks["stage"] == stage) & (masks["round"] == r)] if len(masks) else masks
        n_masks = int(len(mine)) if len(masks) else int(summary.get("masks", 0) or 0)
        n_images = int(mine["image_id"].nunique()) if len(masks) else int(summary.get("images", 0) or 0)
        images = max(n_images, int(summary.get("images", 0) or 0)) or selected
        clicks = _mean(mine["clicks"].tolist()) if len(mine) else None
        seconds = _mean(mine["lead_time_s"].tolist()) if len(mine) else None
        ev = (ledger.get(f"r{r}.eval") or {}).get("outputs") or {}
        dec = (ledger.get(f"r{r}.promote") or {}).get("outputs") or {}
        trained = (ledger.get(f"r{r}.train") or {}).get("outputs") or {}
        rows.append({
            "steps": trained.get("steps"), "planned_steps": trained.get("planned_steps"),
            "train_note": "; ".join(n for n in (trained.get("note") if trained.get("short") else None,
                                                ((dec.get("training") or {}).get("learned_nothing"))) if n) or None,
            "round": r, "stage": stage, "status": stage_rec.get("status", "not run"),
            "images": images, "masks": n_masks,
            "masks_per_image": n_masks / images if images else None,
            "clicks_per_mask": clicks if clicks is not None else summary.get("clicks_per_mask"),
            "seconds_per_mask": seconds if seconds is not None else summary.get("seconds_per_mask"),
            "stage_seconds": stage_rec.get("seconds"),
            "eval": {k: ev.get(k) for k in metric_keys},
            "promoted": dec.get("promoted"), "reason": dec.get("reason"),
        })
    return rows


def model_curve(ledger: Ledger, metric_keys: list[str]) -> list[dict]:
    """The holdout scores of the model in use after each round (round 0: the starting model).

    Each point: {round, in_use: {metric: v}, candidate: {metric: v} | None, promoted: bool | None}.
    """
    base = (ledger.get("r0.eval") or {}).get("outputs")
    if base is None:
        return []
    points = [{"round": 0, "in_use": {k: base.get(k) for k in metric_keys}, "candidate": None, "promoted": None}]
    current = points[0]["in_use"]
    for e in ledger.entries():
        if e["kind"] != "promote" or e["status"] != "done":
            continue
        r = e["round"]
        cand = (ledger.get(f"r{r}.eval") or {}).get("outputs") or {}
        cand = {k: cand.get(k) for k in metric_keys}
        if e["outputs"]["promoted"]:
            current = cand
        points.append({"round": r, "in_use": current, "candidate": cand, "promoted": e["outputs"]["promoted"]})
    return points


def flywheel_rows(ledger: Ledger, rows: list[dict], metric: str | dict[str, float]) -> list[dict]:
    """The per-round figures a user plots to see the flywheel turn (`<report>/rounds.json`): one row per round
    from 0 (the starting model) to the automatic stage.

    Each row: round, stage, steps and planned_steps (optimiser steps its model trained, of those planned: the
    bootstrap for round 0), holdout (the round's candidate on `metric`), in_use (the model in use after the
    round), interval ([low, high] of the paired difference, or None), promoted, general_delta (the candidate
    minus the model in use on the general holdout, or None), clicks_per_mask, seconds_per_mask,
    masks_per_image, prefill_precision (semi), auto_recall_50 / auto_precision_50 / auto_recall_75 /
    auto_precision_75 (automatic, against ground truth where it exists), selection (how images were chosen)
    and uncertainty (the chosen images' mean doubt, "uncertain" selection only).
    """
    base = (ledger.get("r0.eval") or {}).get("outputs") or {}
    in_use = metric_scores(base, metric)[0] if base else None
    boot = (ledger.get("r0.bootstrap") or {}).get("outputs") or {}
    out = [{"round": 0, "stage": "start", "steps": boot.get("steps"), "planned_steps": boot.get("planned_steps"),
            "holdout": in_use, "in_use": in_use, "interval": None, "promoted": None,
            "general_delta": None, "clicks_per_mask": None, "seconds_per_mask": None, "masks_per_image": None,
            "prefill_precision": None, "auto_recall_50": None, "auto_precision_50": None, "auto_recall_75": None,
            "auto_precision_75": None, "selection": None, "uncertainty": None}] if base else []
    for r in rows:
        n = r["round"]
        dec = (ledger.get(f"r{n}.promote") or {}).get("outputs") or {}
        stage_out = (ledger.get(f"r{n}.{r['stage']}") or {}).get("outputs") or {}
        sel = (ledger.get(f"r{n}.select") or {})
        chosen = ((sel.get("outputs") or {}).get("uncertainty") or {}).values()
        truth = stage_out.get("truth") or {}
        trained = (ledger.get(f"r{n}.train") or {}).get("outputs") or {}
        if dec.get("promoted"):
            in_use = dec.get("candidate")
        out.append({
            "round": n, "stage": r["stage"], "steps": trained.get("steps"), "planned_steps": trained.get("planned_steps"),
            "holdout": dec.get("candidate"),
            "in_use": in_use if r["stage"] != "auto" else None, "interval": dec.get("interval"),
            "promoted": dec.get("promoted"), "general_delta": (dec.get("general") or {}).get("delta"),
            "clicks_per_mask": r["clicks_per_mask"], "seconds_per_mask": r["seconds_per_mask"],
            "masks_per_image": r["masks_per_image"], "prefill_precision": stage_out.get("prefill_precision"),
            "auto_recall_50": truth.get("recall_50"), "auto_precision_50": truth.get("precision_50"),
            "auto_recall_75": truth.get("recall_75"), "auto_precision_75": truth.get("precision_75"),
            "selection": (sel.get("inputs") or {}).get("how", "random"),
            "uncertainty": _mean(list(chosen)) if chosen else None})
    return out


def evaluation_figures(ledger: Ledger) -> dict:
    """What two runs of one config must agree on (tests/test_reproducible.py, benchmarks/reproducible.py):
    {values: every holdout figure of every evaluation in ledger order — metrics and per-mask IoUs, the general
    holdout's too —, promotions: [(step, promoted)], steps: optimiser steps of each training, in order}."""
    values, promotions, steps = [], [], []
    for e in ledger.entries():
        out = e.get("outputs") or {}
        if e["kind"] == "eval":
            for part in (out, out.get("general") or {}):
                for key in sorted(part):
                    if key.startswith(("miou@", "box_miou", "oracle@", "AP", "AR")) and part[key] is not None:
                        values.append(float(part[key]))
                for key in sorted(part.get("per_mask") or {}):
                    values += [float(v) for v in part["per_mask"][key]]
        elif e["kind"] == "promote":
            promotions.append((e["step"], out.get("promoted")))
        elif e["kind"] in ("train", "bootstrap"):
            steps.append(out.get("steps"))
    return {"values": values, "promotions": promotions, "steps": steps}


def format_rounds_table(rows: list[dict]) -> str:
    """flywheel_rows as two plain-text tables, each under 80 columns (the demo and benchmarks/flywheel.py print
    them): the models (steps trained, holdout, interval, general holdout, promotion), then the annotation (cost
    per mask, masks per image, prefill precision, the automatic stage against ground truth)."""
    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"

    def steps(r):
        done, planned = r.get("steps"), r.get("planned_steps")
        if done is None:
            return "-"
        return f"{done}/{planned}" + ("*" if planned is not None and done < planned else "") if planned else str(done)

    models = [f"{'round':>5} {'stage':<6} {'steps':>9} {'holdout':>7} {'95% interval':>16} {'general':>7} "
              f"{'promoted':>8}"]
    for r in rows:
        interval = r.get("interval")
        shown = f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "-"
        promoted = "-" if r.get("promoted") is None else ("yes" if r["promoted"] else "no")
        general = "-" if r.get("general_delta") is None else f"{r['general_delta']:+.3f}"
        models.append(f"{r['round']:>5} {r['stage']:<6} {steps(r):>9} {f(r.get('holdout'), 3):>7} {shown:>16} "
                      f"{general:>7} {promoted:>8}")
    if any(r.get("steps") is not None and r.get("planned_steps") and r["steps"] < r["planned_steps"] for r in rows):
        models.append("    * trained short of its planned steps (the wall-clock guard): not comparable")
    work = [f"{'round':>5} {'stage':<6} {'clicks/mask':>11} {'s/mask':>6} {'masks/img':>9} {'prefill P':>9} "
            f"{'auto R@.5':>9} {'auto P@.5':>9}"]
    for r in rows:
        work.append(f"{r['round']:>5} {r['stage']:<6} {f(r.get('clicks_per_mask'), 1):>11} "
                    f"{f(r.get('seconds_per_mask'), 1):>6} {f(r.get('masks_per_image'), 1):>9} "
                    f"{f(r.get('prefill_precision')):>9} {f(r.get('auto_recall_50')):>9} "
                    f"{f(r.get('auto_precision_50')):>9}")
    return "\n".join(models + [""] + work)


def stage_table(rows: list[dict], masks) -> list[dict]:
    """The SAM paper's per-stage view: stage, rounds, images, masks, masks/image, clicks and s per mask."""
    out = []
    for stage in ("manual", "semi", "auto"):
        mine = [r for r in rows if r["stage"] == stage and r["status"] == "done"]
        if not mine:
            continue
        images = sum(r["images"] for r in mine)
        n_masks = sum(r["masks"] for r in mine)
        sub = masks[masks["stage"] == stage] if len(masks) else masks
        clicks = _mean(sub["clicks"].tolist()) if len(sub) else None
        seconds = _mean(sub["lead_time_s"].tolist()) if len(sub) else None
        if seconds is None and stage != "auto":
            seconds = _mean(r["seconds_per_mask"] for r in mine)
        out.append({"stage": stage, "rounds": len(mine), "images": images, "masks": n_masks,
                    "masks_per_image": n_masks / images if images else None,
                    "clicks_per_mask": clicks if clicks is not None else _mean(r["clicks_per_mask"] for r in mine),
                    "seconds_per_mask": seconds,
                    "machine_seconds": sum(r["stage_seconds"] or 0 for r in mine)})
    return out


# --- the Markdown ----------------------------------------------------------------------------------

def _triage(out: dict) -> str:
    """What chose a semi round's prefills: the thresholds, or the verifier (its version and score threshold)."""
    v = out.get("verifier") or {}
    done = (out.get("completed") or {}).get("images")
    if out.get("triage") in ("verifier", "both") and v.get("version"):
        return (f"{out['triage']} ({v['version']}, score ≥ {v['threshold']:.2f})"
                + (f"; {done} image(s) complete without people" if done else ""))
    return "thresholds" + (f" ({v['reason']})" if v.get("reason") else "")


def _steps_cell(r: dict) -> str:
    done, planned = r.get("steps"), r.get("planned_steps")
    if done is None:
        return "–"
    return f"{done} of {planned}" + (" *" if planned and done < planned else "") if planned else str(done)


def holdout_size(cfg: EngineConfig) -> dict:
    """{images, masks} of the frozen holdout every promotion figure is judged on (None each where it is not
    there yet): the configured holdout's annotations, or the one carved from the source (`<workdir>/holdout`)."""
    if cfg.images.holdout_from_source > 0:
        path = str(Path(cfg.path("holdout")) / "annotations.json")
    else:
        path = cfg.path(cfg.images.holdout_ground_truth) if cfg.images.holdout_ground_truth else None
    if not path or not Path(path).is_file():
        return {"images": None, "masks": None}
    images = read_coco(path)
    return {"images": len(images), "masks": sum(len(im.annotations) for im in images)}


def _holdout_size(cfg: EngineConfig) -> str:
    size = holdout_size(cfg)
    return "size unknown" if size["images"] is None else f"{size['images']} images, {size['masks']} masks"


def metric_keys(ledger: Ledger, clicks: list[int]) -> list[str]:
    """mIoU at each configured click count, box mIoU, then whatever AP/AR figures the evaluations hold."""
    keys = [f"miou@{k}" for k in clicks] + ["box_miou"]
    for e in ledger.entries():
        if e["kind"] == "eval" and e["status"] == "done":
            keys += [k for k in e["outputs"] if (k.startswith("AP") or k.startswith("AR")) and k not in keys]
    return keys


@dataclass
class ReportInputs:
    """What the report's sections read: the config, the ledger, the store and its masks, the per-round rows, the
    per-stage table, the model curve, the metric keys and which figures were drawn."""

    cfg: EngineConfig
    workdir: Path
    ledger_path: Path
    ledger: Ledger
    store: object
    masks: object
    keys: list
    rows: list
    points: list
    stages: list
    figures: dict
    shown: object


def write_report(cfg: EngineConfig, out_dir: str | None = None, gallery_images: int = 8) -> str:
    """Write report.md and its PNGs into `out_dir` (default <workdir>/report); returns the report's path."""
    workdir = Path(cfg.workdir).resolve()
    ledger_path = workdir / LEDGER_FILE
    ledger = Ledger(ledger_path)  # stage-only runs (`sa-engine stage …`) have none: the store alone speaks
    out = Path(out_dir) if out_dir else workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    try:
        store, masks = _mask_table(cfg)
    except OSError as e:
        raise ReportError(f"{cfg.storage.root}: cannot read the mask store ({e})") from None

    keys = metric_keys(ledger, cfg.eval.clicks)
    rows = round_rows(ledger, masks, keys)
    points = model_curve(ledger, keys)
    figures = {
        "miou_by_round.png": plot_miou(points, cfg.eval.clicks, out / "miou_by_round.png"),
        "annotation_cost.png": plot_cost(rows, out / "annotation_cost.png"),
        "masks_per_image.png": plot_masks_per_image(rows, out / "masks_per_image.png"),
        "scores.png": plot_scores(masks, out / "scores.png"),
    }
    shown = plot_gallery(cfg, store, masks, out / "gallery.png", gallery_images)
    figures["gallery.png"] = bool(shown)
    inputs = ReportInputs(cfg, workdir, ledger_path, ledger, store, masks, keys, rows, points,
                          stage_table(rows, masks), figures, shown)
    md = [line for section in SECTIONS for line in section(inputs)]
    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(md))
    tmp.replace(report)
    _write_json(out / "report.json", {"rounds": rows, "stages": inputs.stages, "model_curve": points})
    _write_json(out / "rounds.json", flywheel_rows(ledger, rows, cfg.eval.promote_metric))
    return str(report)


def intro_section(inp: "ReportInputs") -> list[str]:
    """The title and where the figures come from (the ledger, or the store alone)."""
    cfg, ledger = inp.cfg, inp.ledger
    md: list[str] = []
    md += ["# sa-engine report", "",
          f"Work dir `{inp.workdir}`; mask store `{cfg.path(cfg.storage.root)}`; " +
          (f"ledger `{inp.ledger_path.name}` ({len(ledger.entries())} steps, "
           f"{sum(e['status'] == 'done' for e in ledger.entries())} done)." if inp.ledger_path.exists() else
           "no ledger (stages run one by one with `sa-engine stage …`): the figures below come from the mask "
           "store alone; round-loop figures (holdout, promotions) need `sa-engine run`."), ""]

    return md


def stage_section(inp: "ReportInputs") -> list[str]:
    """Per stage, shaped like the SAM paper's account of its data engine."""
    md: list[str] = []
    md += ["## Per stage", "",
           "Shaped like the SAM paper's account of its data engine (SA-1B: assisted-manual 4.3 M masks on "
           "120 k images, 34 → 14 s a mask, 20 → 44 masks/image; semi-automatic 5.9 M more masks on 180 k "
           "images, 44 → 72 masks/image; fully automatic 1.1 B masks on 11 M images, ~100 masks/image). "
           "Time per mask is annotator time (simulated: the stated cost per click plus a fixed cost per mask); "
           "the automatic stage has none, its machine time is shown instead.", ""]
    md += _table(["stage", "rounds", "images", "masks", "masks / image", "clicks / mask", "time / mask (s)",
                  "machine time (s)"],
                 [[STAGE_TITLES[s["stage"]], s["rounds"], _fmt(s["images"]), _fmt(s["masks"]),
                   _fmt(s["masks_per_image"], 1), _fmt(s["clicks_per_mask"], 1), _fmt(s["seconds_per_mask"], 1),
                   _fmt(s["machine_seconds"], 0)] for s in inp.stages])
    md += [""]

    return md


def round_section(inp: "ReportInputs") -> list[str]:
    """Per round: the holdout columns, the promotion decisions and their figures."""
    cfg, ledger, rows = inp.cfg, inp.ledger, inp.rows
    md: list[str] = []
    md += ["## Per round", "",
           f"Promotion is gated on the frozen holdout: a retrained model replaces the current one only if its "
           f"`{metric_label(cfg.eval.promote_metric)}` beats the current model's by more than "
           f"{cfg.eval.promote_min_delta:g}. "
           f"The holdout ({_holdout_size(cfg)}) columns are the round's retrained (candidate) model, trained "
           "`steps` optimiser steps of those planned (`*`: stopped short by a wall-clock guard, not comparable); "
           "AP/AR score its automatic masks "
           f"kept at predicted IoU ≥ {EVAL_PRED_IOU_THRESH:g} and stability ≥ {EVAL_STABILITY_SCORE_THRESH:g}, as "
           "`sa-engine eval` does by default.", ""]
    header = ["round", "stage", "images", "masks", "masks / image", "clicks / mask", "s / mask", "steps"] + \
             [f"holdout {k}" for k in inp.keys] + ["promoted"]
    md += _table(header, [[r["round"], r["stage"], _fmt(r["images"]), _fmt(r["masks"]),
                           _fmt(r["masks_per_image"], 1), _fmt(r["clicks_per_mask"], 1),
                           _fmt(r["seconds_per_mask"], 1), _steps_cell(r)] + [_fmt(r["eval"][k], 3) for k in inp.keys] +
                          [_fmt(r["promoted"]) if r["promoted"] is not None else "–"] for r in rows])
    md += ["", "### Promotion decisions", ""]
    if inp.points:
        start = ((ledger.get("r0.eval") or {}).get("outputs") or {})
        md.append(f"- round 0: starting model, holdout {metric_label(cfg.eval.promote_metric)} "
                  f"{_fmt(metric_scores(start, cfg.eval.promote_metric)[0], 3)}")
    md += [f"- round {r['round']} ({r['stage']}): {'promoted' if r['promoted'] else 'kept'} — {r['reason']}"
           + (f" — **{r['train_note']}**" if r.get("train_note") else "")
           for r in rows if r["reason"]]
    md += [""]
    if inp.figures["miou_by_round.png"]:
        md += ["![holdout mIoU by round](miou_by_round.png)", ""]
    if inp.figures["annotation_cost.png"]:
        md += ["![clicks and seconds per mask](annotation_cost.png)", ""]
    if inp.figures["masks_per_image.png"]:
        md += ["![masks per image](masks_per_image.png)", ""]

    return md


def semi_section(inp: "ReportInputs") -> list[str]:
    """The semi-automatic prefills and, in simulation, the triages side by side."""
    ledger, rows = inp.ledger, inp.rows
    md: list[str] = []
    semi = [(r, (ledger.get(f"r{r['round']}.semi") or {}).get("outputs") or {}) for r in rows if r["stage"] == "semi"]
    semi_keys = ["masks_per_image_before", "masks_per_image_after", "prefill_accepted", "prefill_edited",
                 "prefill_rejected", "clicks_per_added_mask", "prefill_precision", "target_precision"]
    if any(any(k in out for k in semi_keys) for _, out in semi):
        md += ["### Semi-automatic prefills", "",
               "Confident masks prefilled by the model, then accepted, edited or rejected by the annotators; "
               "precision is measured on an audited share, against the target.", ""]
        md += _table(["round", "triage"] + [k.replace("_", " ") for k in semi_keys],
                     [[r["round"], _triage(out)] + [_fmt(out.get(k), 3 if "precision" in k else 1) for k in semi_keys]
                      for r, out in semi])
        md += [""]
    compared = [(r["round"], out["triage_comparison"]) for r, out in semi if out.get("triage_comparison")]
    if compared:
        md += ["Triage side by side on each round's candidates (simulated annotators; a mask is right at IoU ≥ "
               "precision IoU to the truth): each way accepts what it trusts, people review the same number of "
               "the rest by its ranking and keep the right ones.", ""]
        md += _table(["round", "candidates", "right", "reviewed", "precision thresholds / verifier / both",
                      "recall thresholds / verifier / both", "auto-accepted thresholds / verifier / both",
                      "verifier"],
                     [[r, c["candidates"], c["right"], c["review_budget"]]
                      + [" / ".join(_fmt(c[m][k], 3 if k != "auto_accepted" else 0)
                                    for m in ("iou", "verifier", "both"))
                         for k in ("precision", "recall", "auto_accepted")]
                      + [c.get("verifier_fitted") or "—"] for r, c in compared])
        md += [""]

    return md


def auto_truth_section(inp: "ReportInputs") -> list[str]:
    """The automatic stage against ground truth, where there is some."""
    ledger = inp.ledger
    md: list[str] = []
    auto = [(e["round"], (e.get("outputs") or {}).get("truth")) for e in ledger.entries()
            if e.get("kind") == "auto" and e.get("status") == "done"]
    auto = [(r, t) for r, t in auto if t]
    if auto:
        md += ["### Automatic stage against ground truth", "",
               "Share of the ground-truth masks that one of the stage's masks overlaps at mask IoU ≥ 0.5 / 0.75 "
               "(recall), and share of the stage's masks that overlap a ground-truth mask (precision), on the "
               "stage's images that have ground truth (`images.ground_truth`).", ""]
        md += _table(["round", "images", "truth masks", "masks", "recall@0.5", "precision@0.5", "recall@0.75",
                      "precision@0.75"],
                     [[r, _fmt(t["images"]), _fmt(t["truth_masks"]), _fmt(t["pred_masks"]), _fmt(t["recall_50"], 3),
                       _fmt(t["precision_50"], 3), _fmt(t["recall_75"], 3), _fmt(t["precision_75"], 3)]
                      for r, t in auto])
        md += [""]

    return md


def scores_section(inp: "ReportInputs") -> list[str]:
    """The score distributions of model-made masks."""
    masks = inp.masks
    md: list[str] = []
    md += ["## Scores", ""]
    if inp.figures["scores.png"]:
        scored = masks[masks["predicted_iou"].notna()]
        md += _table(["stage", "masks", "predicted IoU (median)", "stability (median)"],
                     [[s, _fmt(len(g)), _fmt(g["predicted_iou"].median(), 3), _fmt(g["stability_score"].median(), 3)]
                      for s, g in scored.groupby("stage")])
        md += ["", "![score distributions](scores.png)", ""]
    else:
        md += ["No model-made masks yet.", ""]

    return md


def gallery_section(inp: "ReportInputs") -> list[str]:
    """Masks overlaid on a few images."""
    md: list[str] = []
    md += ["## Gallery", ""]
    md += ["![masks overlaid](gallery.png)", ""] if inp.shown else ["No masks to show yet.", ""]

    return md


def storage_section(inp: "ReportInputs") -> list[str]:
    """Shards, masks and bytes per stage."""
    md: list[str] = []
    md += ["## Storage", ""]
    shard_rows = []
    for s in inp.store.shards():
        shard_rows.append((s.stage, s.rows, s.bytes))
    if shard_rows:
        by_stage: dict[str, list[int]] = {}
        for stage, n, b in shard_rows:
            acc = by_stage.setdefault(stage, [0, 0, 0])
            acc[0] += 1
            acc[1] += n
            acc[2] += b
        md += _table(["stage", "shards", "masks", "bytes", "bytes / mask"],
                     [[s, v[0], _fmt(v[1]), _fmt(v[2]), _fmt(v[2] / v[1] if v[1] else None, 0)]
                      for s, v in sorted(by_stage.items())])
    else:
        md += ["No shards committed yet."]
    md += [""]

    return md


def ledger_section(inp: "ReportInputs") -> list[str]:
    """Every step of the round loop."""
    ledger = inp.ledger
    md: list[str] = []
    md += ["## Ledger", ""]
    md += _table(["step", "status", "attempts", "seconds", "note"],
                 [[e["step"], e["status"], e.get("attempts", 1), _fmt(e.get("seconds"), 1),
                   (e.get("error") or "").replace("|", "/")[:120]] for e in ledger.entries()])
    md += [""]
    return md


# The report, section by section, in order
SECTIONS = (intro_section, stage_section, round_section, semi_section, annotator_section, auto_truth_section,
            scores_section, gallery_section, storage_section, ledger_section)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, default=str, indent=1))
    tmp.replace(path)
