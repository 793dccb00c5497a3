"""The automatic stage on a real local Ray cluster: masks land in the shard store, bad images are
quarantined, reruns are no-ops, and a SIGKILL part-way through loses and duplicates nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine.integrations.config import load_config
from engine.integrations.synth import write_synthetic_dataset
from storage.shards import MaskStore
from tests.output import last_json

REPO = Path(__file__).resolve().parents[1]
AUTO = dict(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
            min_mask_region_area=10, num_actors=2)


def write_config(tmp: Path, n_images: int, images_per_commit: int, **auto) -> Path:
    write_synthetic_dataset(tmp / "data", n_images=n_images, seed=0, size=96)
    cfg = {"workdir": str(tmp / "run"), "images": {"source": str(tmp / "data" / "images")},
           "storage": {"root": str(tmp / "run" / "store")},
           "ray": {"num_cpus": 2, "cpus_per_actor": 0.5},
           "stages": {"auto": {**AUTO, "images_per_commit": images_per_commit, **auto}}}
    path = tmp / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def check_exactly_once(store: MaskStore, image_ids: set[str], model_version: str) -> None:
    """Every image done exactly once for this model version, its masks present once each."""
    index = store.images_table("auto", model_version).to_pylist()
    done = [r["image_id"] for r in index]
    assert sorted(done) == sorted(image_ids), "each image has exactly one 'done' row"
    table = store.read_table(columns=["image_id", "mask_id"], stage="auto")
    mask_ids = table.column("mask_id").to_pylist()
    assert len(mask_ids) == len(set(mask_ids)), "no mask written twice"
    per_image = {}
    for image_id in table.column("image_id").to_pylist():
        per_image[image_id] = per_image.get(image_id, 0) + 1
    for r in index:
        assert per_image.get(r["image_id"], 0) == r["n_masks"]


@pytest.mark.ray
def test_batched_actors_write_the_masks_of_one_image_at_a_time(ray_cluster, tmp_path):
    """`stages.auto.images_per_batch`: an actor decodes a batch of files in threads and embeds the whole
    images in one encoder call; the masks are those of one image at a time, a bad file in the batch is set
    aside and the rest goes on."""
    from stages.auto import run_auto_stage

    rows = {}
    for per_batch in (1, 3):
        cfg_path = write_config(tmp_path / f"b{per_batch}", n_images=5, images_per_commit=2, num_actors=1,
                                images_per_batch=per_batch, crop_n_layers=1)
        (tmp_path / f"b{per_batch}" / "data" / "images" / "zz-broken.png").write_bytes(b"not a png")
        cfg = load_config(cfg_path)
        summary = run_auto_stage(cfg, 1, None, show_progress=False)
        assert summary.images == 5 and summary.quarantined == 1
        table = MaskStore(cfg.path(cfg.storage.root)).read_table(columns=["mask_id", "rle", "predicted_iou"])
        rows[per_batch] = sorted(zip(*(table.column(c).to_pylist() for c in ("mask_id", "rle", "predicted_iou"))))
    assert rows[1] and [r[:2] for r in rows[1]] == [r[:2] for r in rows[3]]
    assert np.allclose([r[2] for r in rows[1]], [r[2] for r in rows[3]], atol=1e-5)


@pytest.mark.ray
def test_the_actors_write_the_masks_and_the_driver_gets_descriptors_only(ray_cluster, tmp_path, fitted_compact):
    """Issue 21: every committed shard is an actor's part (`MaskStore.write_part`), and what the driver received
    is a few bytes per mask (a descriptor per part and a line per image), not the masks."""
    from stages.auto import run_auto_stage

    segmenter, _ = fitted_compact
    segmenter.save(tmp_path / "model")
    cfg_path = write_config(tmp_path, n_images=4, images_per_commit=4, points_per_side=8, images_per_batch=2)
    cfg = load_config(cfg_path, {"model.checkpoint": str(tmp_path / "model")})
    summary = run_auto_stage(cfg, 1, None, show_progress=False)
    assert summary.images == 4 and summary.masks_per_image >= 20 and summary.parts == 2
    assert summary.driver_bytes_per_mask <= 10, summary.driver_bytes_per_mask  # pickled records: ~800 B each
    store = MaskStore(cfg.path(cfg.storage.root))
    assert all(s.commit.startswith("part-") for s in store.shards()) and len(store.shards()) == 2
    check_exactly_once(store, {p.name for p in (tmp_path / "data" / "images").glob("*.png")},
                       summary.model_version)


@pytest.mark.ray
def test_auto_stage_writes_quarantines_and_resumes(ray_cluster, tmp_path):
    from stages.auto import run_auto_stage

    cfg_path = write_config(tmp_path, n_images=4, images_per_commit=2)
    bad = tmp_path / "data" / "images" / "zz-broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = load_config(cfg_path, {"images.ground_truth": str(tmp_path / "data" / "annotations.json")})
    summary = run_auto_stage(cfg, 1, None, show_progress=False)
    assert summary.images == 4 and summary.quarantined == 1 and summary.masks > 0
    n_truth = len(json.loads((tmp_path / "data" / "annotations.json").read_text())["annotations"])
    assert summary.truth["images"] == 4 and summary.truth["truth_masks"] == n_truth
    assert summary.truth["pred_masks"] == summary.masks and 0 <= summary.truth["recall_50"] <= 1
    assert summary.masks_per_image == pytest.approx(summary.masks / 4, rel=1e-3)
    store = MaskStore(cfg.path(cfg.storage.root))
    ids = {p.name for p in (tmp_path / "data" / "images").glob("*.png")} - {bad.name}
    check_exactly_once(store, ids, summary.model_version)
    rec = next(store.iter_records(stage="auto"))
    assert rec.origin == "auto" and rec.round == 1 and rec.model_version == summary.model_version
    assert rec.point_coords and rec.crop_box == [0.0, 0.0, 96.0, 96.0] and rec.predicted_iou is not None
    from storage.quarantine import Quarantine

    entries = Quarantine(cfg.path(cfg.storage.root)).entries()
    assert [e["stage"] for e in entries] == ["auto"] and entries[0]["thing"].endswith("zz-broken.png")
    again = run_auto_stage(cfg, 1, None, show_progress=False)
    assert again.images == 0 and again.already_done == 4 and again.set_aside == 1 and again.quarantined == 0
    check_exactly_once(store, ids, summary.model_version)


@pytest.mark.ray
def test_an_image_missing_at_load_time_is_retried_when_it_is_back(ray_cluster, tmp_path):
    """A file half-copied (0 bytes) when the stage reads it is set aside as transient; the rerun after the copy
    finished processes it (before: it was counted as done forever)."""
    from stages.auto import run_auto_stage
    from storage.quarantine import Quarantine

    cfg = load_config(write_config(tmp_path, n_images=3, images_per_commit=2, num_actors=1))
    late = sorted((tmp_path / "data" / "images").glob("*.png"))[1]
    content = late.read_bytes()
    late.write_bytes(b"")  # the copy has only just begun
    first = run_auto_stage(cfg, 1, None, show_progress=False)
    assert first.images == 2 and first.quarantined == 1
    [entry] = Quarantine(cfg.path(cfg.storage.root)).entries()
    assert entry["kind"] == "transient" and not entry["held"]
    late.write_bytes(content)  # the copy finished
    second = run_auto_stage(cfg, 1, None, show_progress=False)
    assert second.images == 1 and second.retried == 1 and second.quarantined == 0 and second.already_done == 2
    assert Quarantine(cfg.path(cfg.storage.root)).entries() == []  # done now: it left the quarantine
    check_exactly_once(MaskStore(cfg.path(cfg.storage.root)),
                       {p.name for p in (tmp_path / "data" / "images").glob("*.png")}, first.model_version)


def test_steady_rates_leave_each_actors_first_result_out():
    from engine.integrations.stage_kit import steady_rates

    # 2 actors, 6 s start-up, 2 s per image each: pairs of results every 2 s after t = 8
    arrivals = [(8.0, 3), (8.1, 5), (10.0, 4), (10.1, 4), (12.0, 2), (12.1, 6)]
    r = steady_rates(arrivals, num_actors=2)
    assert r["first_result_s"] == 8.0
    assert r["steady_images_per_s"] == pytest.approx(4 / 4.0)  # results 3..6 in t 8.1 -> 12.1
    assert r["steady_masks_per_s"] == pytest.approx(16 / 4.0)
    one = steady_rates([(7.0, 1), (9.0, 1), (11.0, 1)], num_actors=1)
    assert one["steady_images_per_s"] == pytest.approx(0.5)
    assert steady_rates([(7.0, 1)], num_actors=1)["steady_images_per_s"] == 0.0  # too few to tell
    assert steady_rates([], num_actors=2)["first_result_s"] == 0.0


@pytest.mark.slow
def test_sigkill_part_way_then_rerun_gives_each_image_exactly_once(tmp_path):
    n = 8
    cfg_path = write_config(tmp_path, n_images=n, images_per_commit=1, num_actors=1, points_per_side=6)
    cfg = load_config(cfg_path)
    store = MaskStore(cfg.path(cfg.storage.root))
    env = dict(os.environ, SA_ENGINE_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "engine.cli", "stage", "auto", "--config", str(cfg_path), "--round", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(store.images_done("auto")) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the stage ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes the driver started, if any outlived it
        except ProcessLookupError:
            pass
    partial = store.images_done("auto")
    assert 2 <= len(partial) < n, "killed part-way"
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = last_json(rerun.stdout)
    assert summary["already_done"] == len(partial) and summary["images"] == n - len(partial)
    ids = {p.name for p in (tmp_path / "data" / "images").glob("*.png")}
    check_exactly_once(store, ids, summary["model_version"])


def test_calibrated_thresholds_come_from_verified_history(tmp_path):
    """`stages.auto.calibrate`: no history -> the semi stage's stated defaults; with verified masks of an
    earlier round, thresholds are chosen from the generator's masks matched to them."""
    from engine.integrations.config import load_config
    from model.segmenter import Segmenter
    from stages.auto import filter_params, plan_auto_stage
    from storage.images import ImageSource
    from storage.quarantine import Quarantine
    from storage.records import MaskRecord, make_mask_id
    from storage.rle import encode_masks, rle_area, rle_bbox

    path = write_config(tmp_path, 3, 1, calibrate=True)
    cfg = load_config(path, {"calibration.pred_iou_floor": 0.0, "calibration.stability_floor": 0.0,
                             "calibration.min_samples": 1, "calibration.min_kept": 1,
                             "calibration.min_coverage": 0.0})  # an untrained model: judge all
    store, source = MaskStore(cfg.path(cfg.storage.root)), ImageSource(cfg.path(cfg.images.source))
    quarantine = Quarantine(cfg.path(cfg.storage.root))
    model = Segmenter.new("compact", seed=0)

    plan = plan_auto_stage(cfg, round=2, checkpoint=None)
    _, none = filter_params(plan, model, store, source, quarantine)
    assert none["source"] == "default" and none["n_history"] == 0
    assert none["pred_iou_thresh"] == cfg.calibration.default_pred_iou_thresh

    from engine.integrations.synth import make_scene, scene_rng
    _, masks, _ = make_scene(scene_rng(0, 0), 96)  # the ground truth of the first image, as human masks
    rles = encode_masks(masks)
    image_id = source.list()[0].image_id
    with store.writer("manual", 1, None) as w:
        w.add([MaskRecord(image_id=image_id, mask_id=make_mask_id(image_id, i), height=96, width=96, rle=r,
                          area=int(a), bbox=list(b), stage="manual", round=1, verified=True)
               for i, (r, a, b) in enumerate(zip(rles, rle_area(rles), rle_bbox(rles)))])
        w.image_done(image_id, len(rles))
    params, got = filter_params(plan, model, store, source, quarantine)
    assert got["n_history"] > 0 and got["source"] in ("calibrated", "unreachable")


@pytest.mark.ray
def test_the_verifier_keeps_marks_for_review_or_drops_each_mask(ray_cluster, tmp_path, fitted_compact):
    """stages.auto.verifier: every kept mask carries the verifier's version and score; below verifier_drop a mask
    is dropped, below verifier_keep it is marked for the review queue (stages/review.py doubts it)."""
    from model.calibration import best_match_iou
    from model.verifier import MaskVerifier, mask_features, uncovered_objectness
    from stages.auto import run_auto_stage
    from stages.review import doubt
    from storage.rle import encode_masks

    segmenter, scenes = fitted_compact
    segmenter.save(tmp_path / "model")
    # A verifier fitted on the fixture's scenes: candidates right at IoU 0.5 to the truth
    from model.amg import AmgParams, generate_masks
    feats, good = [], []
    for image, masks, _ in scenes:
        cands = generate_masks(segmenter, image, AmgParams(points_per_side=8, pred_iou_thresh=0.0,
                                                           stability_score_thresh=0.0, min_mask_region_area=0))
        rles = [c.rle for c in cands]
        feats.append(mask_features(image, rles, [c.predicted_iou for c in cands], [c.stability_score for c in cands]))
        good.append(best_match_iou(rles, encode_masks(masks)) >= 0.5)
    verifier = MaskVerifier.fit(np.concatenate(feats), np.concatenate(good))
    verifier.save(tmp_path / "verifier.json")

    def run(name: str, keep: float, drop: float):
        cfg_path = write_config(tmp_path / name, n_images=3, images_per_commit=3, points_per_side=8)
        cfg = load_config(cfg_path, {"model.checkpoint": str(tmp_path / "model"),
                                     "stages.auto.verifier": str(tmp_path / "verifier.json"),
                                     "stages.auto.verifier_keep": keep, "stages.auto.verifier_drop": drop})
        s = run_auto_stage(cfg, 1, None, show_progress=False)
        return s, list(MaskStore(cfg.path(cfg.storage.root)).iter_records())

    everything, recs = run("all", 0.0, 0.0)
    scores = np.array([r.verifier_score for r in recs])
    assert everything.verifier_version == verifier.version and everything.verifier_dropped == 0
    assert all(r.verifier_version == verifier.version for r in recs) and len(set(scores.round(6))) > 3
    drop, keep = float(np.quantile(scores, 0.3)), float(np.quantile(scores, 0.7))
    triaged, kept = run("triaged", keep, drop)
    assert triaged.verifier_dropped == int((scores < drop).sum()) > 0
    assert triaged.verifier_review == int(((scores >= drop) & (scores < keep)).sum()) > 0
    assert triaged.masks == len(kept) == len(recs) - triaged.verifier_dropped
    marked = [r for r in kept if (r.source or {}).get("verifier_triage") == "review"]
    assert len(marked) == triaged.verifier_review and all(r.verifier_score < keep for r in marked)
    assert everything.likely_incomplete == []  # nothing dropped, nothing left uncovered
    def bare_images(kept_recs) -> set:  # where what was dropped leaves a fifth of the survivors' area uncovered
        kept_ids, out = {r.mask_id for r in kept_recs}, set()
        for image_id in {r.image_id for r in recs}:
            mine = [r for r in recs if r.image_id == image_id]
            if uncovered_objectness([r.rle for r in mine], [1.0] * len(mine),
                                    np.array([r.mask_id in kept_ids for r in mine]), min_objectness=0.0) >= 0.2:
                out.add(image_id)
        return out

    assert set(triaged.likely_incomplete) == bare_images(kept)
    harsh, harsh_kept = run("harsh", float(np.quantile(scores, 0.95)), float(np.quantile(scores, 0.9)))
    assert harsh.likely_incomplete and set(harsh.likely_incomplete) == bare_images(harsh_kept)
    assert {doubt(r, 0.0) for r in marked} == {"verifier unsure"} and doubt(
        next(r for r in kept if r not in marked), 0.0) is None
