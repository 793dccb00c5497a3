"""The report, built from a real ledger and real mask shards.

A small engine run with cheap real step functions: the stages write the synthetic ground truth into the
shard store as their masks (with clicks, seconds and scores), training and evaluation are the cheap ones from
test_rounds. The report's numbers are checked against what was written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from engine.integrations.config import load_config
from engine.integrations.synth import write_synthetic_dataset
from engine.report import ReportError, _overlay, write_report
from engine.rounds import Steps, default_list_images, run_rounds
from storage.images import image_id_from_key
from storage.records import MaskRecord, make_mask_id
from storage.shards import MaskStore
from tests.test_rounds import evaluate, init_model, train

# clicks per mask the simulated annotators "spend" in each round (falling, as the model improves)
CLICKS = {1: 6, 2: 4, 3: 2}


def _ground_truth(cfg) -> dict[str, list[dict]]:
    coco = json.loads(Path(cfg.path(cfg.images.ground_truth)).read_text())
    names = {im["id"]: image_id_from_key(im["file_name"]) for im in coco["images"]}
    by_image: dict[str, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(names[ann["image_id"]], []).append(ann)
    return by_image


def _stage(stage: str):
    """A stage that commits each selected image's ground-truth masks as its own, with lineage."""
    def run(cfg, round, checkpoint, image_ids):
        gt = _ground_truth(cfg)
        store = MaskStore(cfg.path(cfg.storage.root))
        rng = np.random.default_rng(round)
        n = 0
        with store.writer(stage=stage, round=round, model_version=Path(checkpoint).name) as w:
            for image_id in image_ids:
                records = []
                for k, ann in enumerate(gt.get(image_id, [])):
                    seg = ann["segmentation"]
                    human = stage != "auto" and not (stage == "semi" and k % 2 == 0)
                    records.append(MaskRecord(
                        image_id=image_id, mask_id=make_mask_id(image_id, stage, round, ann["id"]),
                        height=seg["size"][0], width=seg["size"][1],
                        rle={"size": seg["size"], "counts": seg["counts"].encode()}, area=int(ann["area"]),
                        bbox=ann["bbox"], stage=stage, round=round, model_version=Path(checkpoint).name,
                        origin="auto" if stage == "auto" else "manual" if stage == "manual"
                        else "manual_added" if human else "prefill_accepted",
                        predicted_iou=None if human else float(rng.uniform(0.88, 1.0)),
                        stability_score=None if human else float(rng.uniform(0.95, 1.0)),
                        verified=stage != "auto", annotator=None if stage == "auto" else "sim-0",
                        clicks=CLICKS[round] if human else None,
                        lead_time_s=3.0 + 1.5 * CLICKS[round] if human else None))
                w.add(records)
                w.image_done(image_id, len(records))
                n += len(records)
            w.commit()
        out = {"images": len(image_ids), "masks": n, "masks_per_image": n / len(image_ids)}
        if stage == "semi":  # as stages/semi.py's compare_triage reports it in simulation
            out["triage_comparison"] = {
                "candidates": 40, "right": 12, "review_budget": 4, "review_share": 0.1, "verifier_fitted": "verifier-x",
                **{way: {"precision": p, "recall": r, "auto_precision": p, "auto_accepted": a}
                   for way, p, r, a in (("iou", 0.5, 0.25, 6), ("verifier", 0.9, 0.75, 10), ("both", 1.0, 0.5, 5))}}
        return out
    return run


STEPS = Steps(list_images=default_list_images, init_model=init_model, manual=_stage("manual"),
              semi=_stage("semi"), auto=_stage("auto"), train=train, evaluate=evaluate)


@pytest.fixture
def engine_run(tmp_path):
    write_synthetic_dataset(tmp_path / "data", n_images=10, seed=0, size=64)
    data = {"workdir": str(tmp_path / "run"),
            "images": {"source": str(tmp_path / "data" / "images"),
                       "ground_truth": str(tmp_path / "data" / "annotations.json")},
            "stages": {"manual": {"rounds": 2, "images_per_round": 2}, "semi": {"rounds": 1, "images_per_round": 3}}}
    (tmp_path / "engine.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "engine.yaml")
    run_rounds(cfg, STEPS)
    return cfg


def _row(md: str, first_cell: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_numbers_match_the_shards_and_the_ledger(engine_run):
    cfg = engine_run
    path = Path(write_report(cfg, gallery_images=4))
    md = path.read_text()
    out = path.parent

    table = MaskStore(cfg.path(cfg.storage.root)).read_table(columns=["image_id", "stage", "round"]).to_pandas()
    manual = table[table["stage"] == "manual"]
    # SAM-style per-stage table: stage, rounds, images, masks, masks/image, clicks/mask, time/mask
    row = _row(md, "Assisted-manual")
    assert row[1:4] == ["2", "4", f"{len(manual):,}"]
    assert float(row[4]) == pytest.approx(len(manual) / 4, abs=0.05)
    per_round = manual.groupby("round").size()
    clicks = (per_round[1] * 6 + per_round[2] * 4) / len(manual)
    assert float(row[5]) == pytest.approx(clicks, abs=0.05)
    assert float(row[6]) == pytest.approx(3.0 + 1.5 * clicks, abs=0.05)
    auto = _row(md, "Fully automatic")
    assert auto[1:4] == ["1", "3", f"{int((table['stage'] == 'auto').sum()):,}"] and auto[6] == "–"

    # per round: counts, and the gate's decision with its reason (round 2's candidate is worse)
    r2 = _row(md, "2")
    assert r2[1] == "manual" and r2[2] == "2" and r2[3] == str(per_round[2]) and r2[5] == "4.0"
    assert r2[-1] == "no" and _row(md, "1")[-1] == "yes"
    assert re.search(r"- round 2 \(manual\): kept — kept current model: candidate miou@1 0\.2000 vs current "
                     r"0\.2500 is not better", md)
    assert "| holdout miou@1 | holdout miou@3 | holdout miou@5 | holdout box_miou |" in md

    # the semi round's triage comparison, side by side
    assert _row(md.split("Triage side by side")[1], "3") == ["3", "40", "12", "4", "0.500 / 0.900 / 1.000", "0.250 / 0.750 / 0.500",
                                 "6 / 10 / 5", "verifier-x"]
    semi = json.loads((out / "report.json").read_text())["rounds"][2]
    assert semi["stage"] == "semi" and semi["clicks_per_mask"] == 2.0

    # rounds.json: a row per round from the starting model to the automatic stage, for the user's own plots
    flywheel = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in flywheel] == [0, 1, 2, 3, 4]
    assert [r["stage"] for r in flywheel] == ["start", "manual", "manual", "semi", "auto"]
    assert [r["clicks_per_mask"] for r in flywheel[1:4]] == [pytest.approx(6.0), pytest.approx(4.0), 2.0]
    assert flywheel[1]["promoted"] is True and flywheel[2]["promoted"] is False
    assert flywheel[2]["in_use"] == flywheel[1]["holdout"] != flywheel[2]["holdout"]  # a kept model stays in use
    assert flywheel[0]["in_use"] == flywheel[0]["holdout"] is not None
    assert flywheel[1]["masks_per_image"] == pytest.approx(r1_masks_per_image := float(_row(md, "1")[4]), abs=0.05)
    assert r1_masks_per_image > 0 and flywheel[4]["selection"] == "random"

    for name in ("miou_by_round.png", "annotation_cost.png", "masks_per_image.png", "scores.png", "gallery.png"):
        assert f"({name})" in md
        with Image.open(out / name) as im:
            assert im.size[0] > 400 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 5  # not blank
    assert "| manual | 2 |" in md.split("## Storage")[1]  # two manual shards' worth of commits


def test_report_without_a_ledger_or_masks(tmp_path):
    # stage-only runs (`sa-engine stage auto`) leave masks but no ledger: the report speaks from the store
    from tests.export_fixtures import build_store

    build_store(tmp_path / "stage-only")
    cfg = load_config(None, overrides={"workdir": str(tmp_path / "stage-only" / "work"),
                                       "storage.root": str(tmp_path / "stage-only" / "store"),
                                       "images.source": str(tmp_path / "stage-only" / "images")})
    md = Path(write_report(cfg)).read_text()
    assert "no ledger (stages run one by one" in md and "| Fully automatic |" in md and "gallery.png" in md

    images = tmp_path / "imgs"
    images.mkdir()
    cfg = load_config(None, overrides={"workdir": str(tmp_path / "empty"), "images.source": str(images),
                                       "stages.manual.rounds": 0, "stages.semi.rounds": 0})
    run_rounds(cfg, STEPS)  # no images at all: init only, nothing for the automatic stage
    md = Path(write_report(cfg)).read_text()
    assert "No shards committed yet." in md and "No masks to show yet." in md and "| r0.init | done |" in md


def test_overlay_tints_masks_and_keeps_the_rest():
    pixels = np.full((20, 30, 3), 100, np.uint8)
    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:18, 2:28] = True
    masks[1, 8:12, 10:14] = True
    out = _overlay(pixels, masks)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert (out[0, 0] == 100).all()  # outside every mask: untouched
    assert not (out[10, 11] == out[4, 20]).all()  # the small mask painted over the large one


def test_the_annotators_section_scores_each_person_against_the_ground_truth(engine_run):
    """Per annotator: masks, clicks and seconds per mask from the shards, and the mean IoU of their masks to the
    true object each overlaps most. sim-0 drew the ground truth itself (IoU 1); a shaky annotator's masks, the
    same objects moved 2 px, score what numpy says a 2 px shift costs."""
    from pycocotools import mask as mask_utils

    cfg = engine_run
    store = MaskStore(cfg.path(cfg.storage.root))
    gt = _ground_truth(cfg)
    image_id = sorted(store.images_done("manual"))[0]
    shaky, expected = [], []
    for k, ann in enumerate(gt[image_id]):
        seg = ann["segmentation"]
        truth = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        moved = np.roll(truth, 2, axis=1)
        rle = mask_utils.encode(np.asfortranarray(moved.astype(np.uint8)))
        shaky.append(MaskRecord.from_rle(image_id, make_mask_id(image_id, "manual", 9, k), rle, "manual", 9,
                                         annotator="shaky", verified=True, clicks=3, lead_time_s=12.0))
        others = [mask_utils.decode({"size": a["segmentation"]["size"],
                                     "counts": a["segmentation"]["counts"].encode()}).astype(bool)
                  for a in gt[image_id]]
        expected.append(max((moved & o).sum() / max((moved | o).sum(), 1) for o in others))
    with store.writer(stage="manual", round=9, model_version="m") as w:
        w.add(shaky)
        w.image_done(image_id, len(shaky))
        w.commit()

    md = Path(write_report(cfg, gallery_images=0)).read_text()
    section = md.split("## Annotators")[1].split("\n## ")[0]
    human = MaskStore(cfg.path(cfg.storage.root)).read_table(columns=["annotator", "stage", "clicks"]).to_pandas()
    sim0 = human[(human["annotator"] == "sim-0") & human["stage"].isin(["manual", "semi"])]
    row = _row(section, "sim-0")
    assert row[1] == f"{len(sim0):,}" and float(row[3]) == pytest.approx(sim0["clicks"].dropna().mean(), abs=0.05)
    assert row[5] == "1.000" and row[6] == "1.000"
    row = _row(section, "shaky")
    assert row[1:5] == [str(len(shaky)), "1", "3.0", "12.0"]
    assert float(row[5]) == pytest.approx(np.mean(expected), abs=5e-4) and float(row[5]) < 0.99
    assert float(row[6]) == pytest.approx(np.mean(np.asarray(expected) >= 0.75), abs=5e-4)
