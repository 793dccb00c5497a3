"""The assisted-manual stage end to end on a few synthetic images, with simulated annotators, against the
real Label Studio server (shared session fixture) and our ML backend."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from engine.cli import app
from engine.integrations.labelstudio import LabelStudio, free_port
from engine.integrations.synth import write_synthetic_dataset
from storage.shards import MaskStore
from tests.output import last_json

pytestmark = pytest.mark.labelstudio
torch.set_num_threads(1)


SIMULATE = ("max_clicks", "image_time_limit_s")  # the simulated annotators' keys (the simulate section)


def write_config(tmp_path, server, n_images: int, seed: int, manual: dict, **images):
    """A synthetic data set of `n_images` 96 px scenes and a config using the shared Label Studio server."""
    write_synthetic_dataset(tmp_path / "synth", n_images=n_images, seed=seed, size=96)
    cfg = {"workdir": str(tmp_path), "images": {"source": "synth/images", "ground_truth": "synth/annotations.json",
                                                "holdout_source": None, "holdout_ground_truth": None, **images},
           "labelstudio": {"managed": False, "url": server.url, "token": server.token,
                           "ml_backend_port": free_port()},
           "stages": {"manual": {k: v for k, v in manual.items() if k not in SIMULATE}},
           "simulate": {k: v for k, v in manual.items() if k in SIMULATE}}
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def config_file(labelstudio_server, tmp_path):
    return write_config(tmp_path, labelstudio_server, 3, 0,
                        {"images_per_round": 2, "max_clicks": 3, "image_time_limit_s": 60.0})


def test_simulated_manual_round_writes_verified_masks_once(config_file, tmp_path, labelstudio_server):
    runner = CliRunner()
    res = runner.invoke(app, ["stage", "manual", "--config", str(config_file), "--round", "1"])
    assert res.exit_code == 0, res.output
    summary = last_json(res.stdout)
    assert summary["images"] == 2 and summary["masks"] > 0
    sim = summary["simulated"]
    assert sim["masks"] == summary["masks"] == summary["pull"]["written"]
    assert 1 <= summary["clicks_per_mask"] <= 3 and summary["seconds_per_mask"] > 0
    # corrective clicks are counted, and those after which the mask fitted worse
    assert sim["corrective_clicks"] == round(sim["clicks_per_mask"] * sim["masks"]) - sim["masks"]
    assert 0 <= sim["clicks_that_hurt"] <= sim["corrective_clicks"] and 0 <= sim["mean_first_click_iou"] <= 1
    assert summary["embeddings"]["precomputed"] == 2  # the backend read the embeddings made before annotation
    rows = MaskStore(str(tmp_path / "store")).read_table(stage="manual").to_pylist()
    assert len(rows) == summary["masks"]
    assert all(r["verified"] and r["round"] == 1 and r["annotator"] == "sim-annotator-1@sa-engine.local"
               and 1 <= r["clicks"] <= 3 and r["lead_time_s"] > 0 for r in rows)
    assert all(json.loads(r["source"])["ls_project"] == summary["ls_project_id"] for r in rows)
    ls = labelstudio_server.client
    anns = list(ls.sdk.annotations.list(id=next(iter(ls.task_ids(summary["ls_project_id"]).values()))))
    assert anns and anns[0].lead_time > 0

    again = runner.invoke(app, ["stage", "manual", "--config", str(config_file), "--round", "1"])
    assert again.exit_code == 0, again.output
    second = last_json(again.stdout)
    # The round's images are done: the next run takes the remaining image, pulls, and rewrites nothing.
    assert second["pull"]["unchanged"] == summary["masks"] and second["ls_project_id"] == summary["ls_project_id"]


def test_annotate_cli_directly_against_the_backend(config_file, tmp_path, labelstudio_server):
    from engine.integrations.config import load_config
    from engine.integrations.labelling import task_images
    from engine.integrations.runtime import image_source

    cfg = load_config(config_file)
    ls: LabelStudio = labelstudio_server.client
    pid = ls.ensure_project(f"annotate cli {tmp_path.name[-20:]}")
    try:
        ls.add_local_storage(pid, tmp_path)
        images, _, _ = task_images(cfg, image_source(cfg), ["synth-s0-00002.png"], None, "manual")
        ls.import_tasks(pid, images)
        res = CliRunner().invoke(app, ["annotate", "--simulate", "--project", f"annotate cli {tmp_path.name[-20:]}",
                                       "--config", str(config_file), "--via", "backend"])
        assert res.exit_code == 0, res.output
        out = last_json(res.stdout)
        assert out["images"] == 1 and out["masks"] > 0 and out["via"] == "backend"
        assert len(ls.annotated_task_ids(pid)) == 1
    finally:
        ls.delete_project(pid)


def test_masks_drawn_on_a_downscaled_task_are_stored_at_the_file_size(labelstudio_server, tmp_path):
    """Issue 31.12: images larger than images.max_side are shown in Label Studio downscaled (96 px files as 64 px
    tasks); the masks drawn there, pulled through the real server, are stored at the files' size and sit where
    the objects are."""
    from pycocotools import mask as mask_utils

    from storage.coco import load_ground_truth

    path = write_config(tmp_path, labelstudio_server, 1, 3,
                        {"images_per_round": 1, "max_clicks": 3, "image_time_limit_s": 60.0}, max_side=64)
    res = CliRunner().invoke(app, ["stage", "manual", "--config", str(path), "--round", "1"])
    assert res.exit_code == 0, res.output
    rows = MaskStore(str(tmp_path / "store")).read_table(stage="manual").to_pylist()
    assert rows and all((r["height"], r["width"]) == (96, 96) for r in rows)
    truth = load_ground_truth(str(tmp_path / "synth" / "annotations.json"))
    objects = [o.mask for objs in truth.values() for o in objs]
    assert all(o.shape == (96, 96) for o in objects)
    for r in rows:  # each stored mask lies on one of the image's objects, at the file's scale
        mask = mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle"]}).astype(bool)
        best = max((mask & o).sum() / max(1, (mask | o).sum()) for o in objects)
        assert best >= 0.3, best


def test_a_holdout_is_drawn_whole_where_a_round_leaves_objects_for_lack_of_time(labelstudio_server, tmp_path):
    """Issue 30: simulated annotators drawing a holdout have no per-image time limit, so every object is drawn
    (the holdout's masks equal its ground truth's objects) where a manual round with the same settings leaves
    objects undrawn; the completeness check finds nothing to warn about."""
    from engine.integrations.config import load_config
    from engine.rounds import default_holdout

    # time for about one object per image: a round leaves the rest, as SA-1B's annotators did
    path = write_config(tmp_path, labelstudio_server, 1, 5,
                        {"images_per_round": 1, "max_clicks": 2, "image_time_limit_s": 8.0})
    config = load_config(path)
    (image_id,) = [p.name for p in (tmp_path / "synth" / "images").iterdir()]
    objects = len(json.loads((tmp_path / "synth" / "annotations.json").read_text())["annotations"])
    assert objects >= 3
    hold = default_holdout(config, None, [image_id])
    assert hold["masks"] == hold["truth_masks"] == objects and hold["per_image"] == {image_id: objects}
    assert hold["warnings"] == []
    res = CliRunner().invoke(app, ["stage", "manual", "--config", str(path), "--round", "1"])
    assert res.exit_code == 0, res.output
    summary = last_json(res.stdout)
    assert summary["masks"] < objects and summary["simulated"]["left_by_time_limit"] > 0


def test_gold_tasks_are_mixed_in_scored_per_annotator_and_never_stored(labelstudio_server, tmp_path):
    """gold_share 0.5 of 2 images: one holdout image joins the round's project; the simulated annotator draws it
    like the others; its masks are scored against the holdout's known masks (a simulated annotator drawing the
    truth scores high) and are not in the store, nor is any holdout image."""
    from engine.integrations.config import load_config
    from stages.manual import GOLD_PREFIX, run_manual_stage

    write_synthetic_dataset(tmp_path / "holdout", n_images=3, seed=11, size=96)
    path = write_config(tmp_path, labelstudio_server, 3, 0, {"images_per_round": 2, "max_clicks": 3,
                                                             "image_time_limit_s": 60.0, "gold_share": 0.5},
                        holdout_source="holdout/images", holdout_ground_truth="holdout/annotations.json")
    cfg = load_config(path)
    summary = run_manual_stage(cfg, 1, None).to_dict()
    assert summary["images"] == 2 and summary["masks"] > 0
    gold = summary["gold"]
    assert gold["images"] == 1 and list(gold["by_annotator"]) == ["sim-annotator-1@sa-engine.local"]
    scored = gold["by_annotator"]["sim-annotator-1@sa-engine.local"]
    assert scored["masks"] > 0 and scored["iou"] > 0.3 and 0 < scored["recall_50"] <= 1
    tasks = LabelStudio(labelstudio_server.url, labelstudio_server.token).task_ids(summary["ls_project_id"])
    assert len(tasks) == 3 and sum(i.startswith(GOLD_PREFIX) for i in tasks) == 1
    stored = set(MaskStore(str(tmp_path / "store")).read_table(columns=["image_id"]).column("image_id").to_pylist())
    holdout_ids = {p.name for p in (tmp_path / "holdout" / "images").iterdir()}
    assert stored and not stored & holdout_ids and not any(i.startswith(GOLD_PREFIX) for i in stored)


def test_gold_scores_are_the_iou_to_the_known_masks():
    """score_gold against numpy: the truth itself scores 1 and finds every object; the truth moved 3 px scores
    the IoU numpy computes for that move."""
    import numpy as np

    from stages.manual import GOLD_PREFIX, GoldPlan, score_gold
    from storage.coco import GTObject
    from storage.records import MaskRecord
    from storage.rle import encode_masks

    truth = np.zeros((2, 40, 40), bool)
    truth[0, 5:20, 5:20] = True
    truth[1, 25:38, 22:36] = True
    plan = GoldPlan(["h.png"], None, {"h.png": [GTObject(k, truth[k]) for k in range(2)]})

    def records(masks, who):
        return [MaskRecord.from_rle(GOLD_PREFIX + "h.png", f"{who}{k}", rle, "manual", 1, annotator=who)
                for k, rle in enumerate(encode_masks(masks))]

    moved = np.roll(truth[:1], 3, axis=2)
    out = score_gold(records(truth, "exact") + records(moved, "shaky"), plan)["by_annotator"]
    assert out["exact"] == {"masks": 2, "iou": 1.0, "recall_50": 1.0}
    want = (moved[0] & truth[0]).sum() / (moved[0] | truth[0]).sum()
    assert out["shaky"]["iou"] == pytest.approx(want, abs=1e-3) and out["shaky"]["recall_50"] == 0.5


def test_double_tasks_store_one_annotation_and_measure_agreement(labelstudio_server, tmp_path):
    """double_share 0.5: Label Studio wants two annotations on half the tasks; a second (hastier) simulated person
    draws them; the store keeps only the first person's masks, the pair's agreement is recorded per annotator
    and shown in the report."""
    from engine.integrations import agreement
    from engine.integrations.config import load_config
    from stages.manual import run_manual_stage

    path = write_config(tmp_path, labelstudio_server, 4, 3, {"images_per_round": 4, "max_clicks": 3,
                                                             "image_time_limit_s": 60.0, "double_share": 0.5})
    cfg = load_config(path)
    summary = run_manual_stage(cfg, 1, None).to_dict()
    pairs = summary["agreement"]["pairs"]
    assert len(pairs) == 2 and all(tuple(p[:2]) == ("sim-annotator-1@sa-engine.local",
                                                    "sim-annotator-2@sa-engine.local") for p in pairs)
    assert all(0.0 < p[2] <= 1.0 for p in pairs)
    rows = MaskStore(str(tmp_path / "store")).read_table(columns=["annotator"]).column("annotator").to_pylist()
    assert set(rows) == {"sim-annotator-1@sa-engine.local"} and len(rows) == summary["masks"]
    scores = agreement.by_annotator(cfg.workdir)
    assert scores["sim-annotator-2@sa-engine.local"]["double_tasks"] == 2
    assert scores["sim-annotator-1@sa-engine.local"]["agreement"] == pytest.approx(sum(p[2] for p in pairs) / 2)
    agreement.record(cfg.workdir, 1, [("x", "y", 0.1)])  # a rerun of round 1 counts once
    assert "x" not in agreement.by_annotator(cfg.workdir)


def test_pair_agreement_is_the_mean_best_iou_both_ways():
    import numpy as np

    from engine.integrations.agreement import pair_agreement

    a = np.zeros((2, 30, 30), bool)
    a[0, 2:12, 2:12] = True
    a[1, 15:28, 15:28] = True
    b = np.roll(a[:1], 2, axis=1)  # the other person drew the first object 2 px lower and missed the second
    shifted = (a[0] & b[0]).sum() / (a[0] | b[0]).sum()
    assert pair_agreement(a, a) == 1.0
    assert pair_agreement(a, b) == pytest.approx((shifted + 0.0 + shifted) / 3)
    assert pair_agreement(a[:0], b[:0]) == 1.0 and pair_agreement(a, b[:0]) == 0.0
