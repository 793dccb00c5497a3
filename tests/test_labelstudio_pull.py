"""Projects, tasks and predictions in Label Studio, and pulling annotations back into the shard store."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from engine.integrations.labelstudio import (
    LabelStudio,
    LabelStudioUnavailable,
    PrefillMask,
    TaskImage,
    brush_result,
    free_port,
)
from stages.manual import pull_to_store
from storage.quarantine import Quarantine
from storage.rle import decode_rles
from storage.shards import MaskStore

pytestmark = pytest.mark.labelstudio
H, W = 48, 64


def _disc(cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


@pytest.fixture
def project(labelstudio_server, tmp_path):
    """A project with 3 tasks whose images are PNGs under tmp_path (served by Local Storage)."""
    from PIL import Image

    ls: LabelStudio = labelstudio_server.client
    folder = tmp_path / "images"
    folder.mkdir()
    images = []
    for i in range(3):
        path = folder / f"img{i}.png"
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(path)
        images.append(TaskImage(f"img{i}.png", LabelStudio.local_file_url(path, labelstudio_server.document_root),
                                H, W))
    pid = ls.ensure_project(f"pull test {tmp_path.name[-30:]}")
    ls.add_local_storage(pid, folder)
    prefill = {"img0.png": [PrefillMask(_disc(20, 20, 8), 0.9), PrefillMask(_disc(30, 45, 6), 0.8)]}
    tasks = ls.import_tasks(pid, images, prefill, model_version="round0-model")
    yield ls, pid, tasks, images
    ls.delete_project(pid)


def test_tasks_import_once_and_images_are_served(project, labelstudio_server):
    ls, pid, tasks, images = project
    assert sorted(tasks) == ["img0.png", "img1.png", "img2.png"]
    assert ls.import_tasks(pid, images) == tasks  # importing again adds nothing
    req = urllib.request.Request(labelstudio_server.url + images[1].url,
                                 headers={"Authorization": f"Token {labelstudio_server.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"
    preds = list(ls.sdk.predictions.list(task=tasks["img0.png"]))
    assert len(preds) == 1 and preds[0].model_version == "round0-model"
    assert [r["value"]["brushlabels"] for r in preds[0].result] == [["prefill"], ["prefill"]]


def test_pull_is_idempotent_and_an_edit_replaces_the_older_version(project, tmp_path):
    ls, pid, tasks, images = project
    store = MaskStore(str(tmp_path / "store"))
    a, b = _disc(10, 10, 5), _disc(35, 50, 7)
    aid = ls.create_annotation(tasks["img1.png"], [brush_result(a, H, W, region_id="r-a", meta={"clicks": 2}),
                                                   brush_result(b, H, W, region_id="r-b")], lead_time_s=12.0)
    first = pull_to_store(ls, pid, store, round=1, model_version="m1", expected_tasks=tasks)
    assert (first["pulled"], first["written"], first["problems"]) == (2, 2, 0)
    rows = store.read_table(stage="manual").to_pylist()
    by_region = {r["source"].split('"ls_region": "')[1].split('"')[0]: r for r in rows}
    ra = by_region["r-a"]
    assert ra["verified"] and ra["stage"] == "manual" and ra["round"] == 1 and ra["clicks"] == 2
    assert ra["annotator"] == "admin@sa-engine.local" and f'"ls_annotation": {aid}' in ra["source"]
    assert by_region["r-b"]["lead_time_s"] == pytest.approx(6.0)  # 12 s shared by 2 masks (no per-mask time)
    masks = decode_rles([{"size": [H, W], "counts": r["rle"]} for r in (ra, by_region["r-b"])])
    assert np.array_equal(masks[0], a) and np.array_equal(masks[1], b)

    again = pull_to_store(ls, pid, store, round=1, model_version="m1", expected_tasks=tasks)
    assert (again["written"], again["unchanged"]) == (0, 2)
    assert store.read_table(stage="manual").num_rows == 2

    a2 = _disc(12, 12, 9)
    ls.update_annotation(aid, [brush_result(a2, H, W, region_id="r-a"), brush_result(b, H, W, region_id="r-b")])
    edited = pull_to_store(ls, pid, store, round=1, model_version="m1", expected_tasks=tasks)
    assert (edited["written"], edited["updated"], edited["unchanged"]) == (1, 1, 1)
    rows = store.read_table(stage="manual").to_pylist()
    assert len(rows) == 2
    newest = next(r for r in rows if '"r-a"' in r["source"])
    assert np.array_equal(decode_rles([{"size": [H, W], "counts": newest["rle"]}])[0], a2)
    assert newest["history"] and '"manual"' in newest["history"]  # the replaced version is kept in lineage


def test_bad_annotations_are_reported_and_skipped(project, tmp_path):
    ls, pid, tasks, images = project
    store = MaskStore(str(tmp_path / "store"))
    quarantine = Quarantine(str(tmp_path / "store"))
    good = brush_result(_disc(20, 30, 6), H, W, region_id="good")
    empty = brush_result(np.zeros((H, W), bool), H, W, region_id="empty")
    wrong_size = brush_result(np.ones((H + 2, W), bool), H + 2, W, region_id="wrong-size")
    corrupt = brush_result(_disc(5, 5, 3), H, W, region_id="corrupt")
    corrupt["value"]["rle"] = corrupt["value"]["rle"][: len(corrupt["value"]["rle"]) // 2]
    ls.create_annotation(tasks["img2.png"], [good, empty, wrong_size, corrupt], lead_time_s=5.0)
    ls.delete_task(tasks["img1.png"])
    out = pull_to_store(ls, pid, store, round=1, model_version="m1", quarantine=quarantine, expected_tasks=tasks)
    assert (out["written"], out["problems"], out["missing_tasks"]) == (1, 4, 1)
    reasons = " | ".join(e["reason"] for e in quarantine.entries())
    assert "empty brush mask" in reasons and "but the image is 64x48" in reasons
    assert "corrupt brush RLE" in reasons and "deleted" in reasons
    assert [r["source"] for r in store.read_table(stage="manual").to_pylist()][0].count('"good"') == 1


def test_pull_returns_which_prediction_a_region_came_from(project):
    ls, pid, tasks, images = project
    pred = list(ls.sdk.predictions.list(task=tasks["img0.png"]))[0]
    accepted, edited = pred.result[0], dict(pred.result[1])
    edited["value"] = dict(edited["value"], rle=brush_result(_disc(30, 45, 9), H, W)["value"]["rle"],
                           brushlabels=["object"])
    ls.create_annotation(tasks["img0.png"], [accepted, edited], lead_time_s=3.0, parent_prediction=pred.id)
    pulled = ls.pull(pid)
    (ann,) = [a for a in pulled.annotations if a.task_id == tasks["img0.png"]]
    r0, r1 = ann.regions
    assert r0.prediction_id == pred.id and np.array_equal(r0.mask, r0.prediction_mask)
    assert r1.prediction_id == pred.id and r1.label == "object"
    assert np.array_equal(r1.prediction_mask, _disc(30, 45, 6)) and not np.array_equal(r1.mask, r1.prediction_mask)


def test_unreachable_server_retries_then_fails_clearly_writing_nothing(tmp_path):
    store = MaskStore(str(tmp_path / "store"))
    ls = LabelStudio(f"http://127.0.0.1:{free_port()}", "a" * 40, retries=2, backoff_s=0.05)
    with pytest.raises(LabelStudioUnavailable, match="unreachable during create export after 3 tries"):
        pull_to_store(ls, 1, store, round=1, model_version="m1")
    assert store.shards() == [] and not (tmp_path / "store").exists() or store.read_table().num_rows == 0


def test_a_region_marked_unsure_reaches_the_store_and_the_review_queue(project, tmp_path):
    """The per-region "unsure" choice of the labelling page (stored by Label Studio under the region's id) is
    pulled as `source.unsure` and makes the mask one the review queue takes first, whoever drew it."""
    from engine.integrations.labelstudio import unsure_result
    from stages.review import doubted

    ls, pid, tasks, images = project
    store = MaskStore(str(tmp_path / "store"))
    a, b = _disc(10, 10, 5), _disc(35, 50, 7)
    ls.create_annotation(tasks["img0.png"], [brush_result(a, H, W, region_id="r-sure"),
                                             brush_result(b, H, W, region_id="r-doubt"),
                                             unsure_result("r-doubt", H, W)], lead_time_s=4.0)
    pulled = pull_to_store(ls, pid, store, round=1, model_version="m1", expected_tasks=tasks)
    assert pulled["written"] == 2 and pulled["problems"] == 0
    rows = {r.source["ls_region"]: r for r in store.iter_records(stage="manual")}
    assert rows["r-doubt"].source.get("unsure") is True and "unsure" not in rows["r-sure"].source
    queue = doubted(store, 1, max_predicted_iou=0.8, max_masks=10)
    assert [(r.source["ls_region"], why) for r, why in queue] == [("r-doubt", "annotator unsure")]
