"""The review queue (stages/review.py): which masks the engine doubts, and their decisions in the lineage —
through the real Label Studio with a simulated reviewer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.integrations.config import EngineConfig
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_masks, rle_area, rle_bbox


def _record(image_id: str, mask: np.ndarray, k: int, origin: str = "prefill_accepted", predicted_iou=0.95,
            source: dict | None = None) -> MaskRecord:
    rle = encode_masks(mask[None])[0]
    return MaskRecord(image_id=image_id, mask_id=make_mask_id(image_id, "semi", 3, k), height=mask.shape[0],
                      width=mask.shape[1], rle=rle, area=int(rle_area([rle])[0]), bbox=rle_bbox([rle])[0].tolist(),
                      stage="semi", round=3, model_version="m3", predicted_iou=predicted_iou, stability_score=0.97,
                      origin=origin, annotator="sim-annotator-1", verified=True, source=source or {"ls_task": k})


def test_what_is_doubted_and_in_which_order():
    from stages.review import doubt

    m = np.zeros((8, 8), bool)
    m[2:5, 2:5] = True
    assert doubt(_record("a", m, 0, predicted_iou=0.95), 0.8) is None  # trusted
    assert doubt(_record("a", m, 1, predicted_iou=0.6), 0.8) == "low predicted IoU"
    assert doubt(_record("a", m, 2, source={"audit": {"pending": True}}), 0.8) == "audit pending"
    assert doubt(_record("a", m, 3, source={"audit": {"iou": 0.4, "passed": False}}), 0.8) == "audit failed"
    assert doubt(_record("a", m, 4, origin="manual_added", predicted_iou=None), 0.8) is None  # a person drew it
    assert doubt(_record("a", m, 5, predicted_iou=0.1, source={"review": {"decision": "accepted"}}), 0.8) is None
    # the annotator's own "unsure" tick sends even a drawn mask to review, once
    assert doubt(_record("a", m, 6, origin="manual", predicted_iou=None, source={"unsure": True}), 0.8) == "annotator unsure"
    assert doubt(_record("a", m, 7, origin="manual", source={"unsure": True, "review": {"decision": "fixed"}}), 0.8) is None


def _cfg(tmp_path: Path, server) -> EngineConfig:
    from engine.integrations.config import load_config
    from engine.integrations.labelstudio import free_port
    from engine.integrations.synth import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, n_images=2, seed=5, size=96)
    return load_config(None, overrides={
        "workdir": str(tmp_path / "run"), "images.source": str(data / "images"),
        "images.ground_truth": str(data / "annotations.json"), "storage.root": str(tmp_path / "store"),
        "labelstudio.managed": False, "labelstudio.url": server.url, "labelstudio.token": server.token,
        "labelstudio.ml_backend_port": free_port(), "simulate.max_clicks": 2,
        "simulate.image_time_limit_s": 600.0, "stages.review.max_predicted_iou": 0.8})


@pytest.mark.labelstudio
@pytest.mark.slow
def test_review_decisions_go_into_the_lineage(labelstudio_server, tmp_path):
    """Three doubted masks on one image — right (kept), off (fixed), wrong (deleted) — and a trusted one that is
    not sent; the decisions land in the store as upserts with their history; a rerun sends nothing again."""
    from storage.coco import load_ground_truth
    from stages.review import run_review_stage
    from storage.images import ImageSource
    from storage.shards import MaskStore

    cfg = _cfg(tmp_path, labelstudio_server)
    image_id = ImageSource(cfg.images.source).list()[0].image_id
    whole = sorted((o for o in load_ground_truth(cfg.images.ground_truth)[image_id] if o.parent_id is None),
                   key=lambda o: -int(o.mask.sum()))
    a, b = whole[0].mask, whole[1].mask
    for dx in range(1, 40):  # the right object, visibly off: IoU in [0.5, 0.85), which a reviewer fixes
        shifted = np.roll(b, dx, axis=1)
        if np.count_nonzero(shifted & b) / np.count_nonzero(shifted | b) < 0.75:
            break
    assert 0.5 <= np.count_nonzero(shifted & b) / np.count_nonzero(shifted | b) < 0.85
    wrong = np.zeros_like(a)
    wrong[:4, :4] = True  # nothing there
    records = [_record(image_id, a, 0, predicted_iou=0.7), _record(image_id, shifted, 1, predicted_iou=0.6),
               _record(image_id, wrong, 2, source={"audit": {"pending": True}}),
               _record(image_id, a.copy(), 3, predicted_iou=0.99)]
    store = MaskStore(cfg.storage.root)
    with store.writer("semi", 3, "m3") as w:
        w.add(records)
        w.image_done(image_id, len(records))

    summary = run_review_stage(cfg, 3, None, simulate=True)
    assert summary.queued == 3 and summary.reasons == {"audit pending": 1, "low predicted IoU": 2}
    assert (summary.accepted, summary.fixed, summary.rejected, summary.undecided) == (1, 1, 1, 0)
    back = {r.mask_id: r for r in store.iter_records(stage="semi", round=3)}
    assert len(back) == 4  # upserts: no mask twice
    kept, fixed, gone, trusted = (back[r.mask_id] for r in records)
    assert kept.source["review"]["decision"] == "accepted" and kept.verified and kept.rle == records[0].rle
    assert fixed.source["review"]["decision"] == "fixed" and fixed.verified and fixed.rle != records[1].rle
    assert 0 < fixed.source["review"]["iou"] < 1 and fixed.source["review"]["reviewer"]
    assert gone.source["review"]["decision"] == "rejected" and not gone.verified  # out of training and calibration
    assert "review" not in trusted.source and trusted.verified
    import hashlib

    old = fixed.history[-1]  # the version before the review is kept in the history
    assert old["rle_sha1"] == hashlib.sha1(records[1].rle["counts"]).hexdigest()[:16] and old["verified"]

    again = run_review_stage(cfg, 3, None, simulate=True)
    assert again.queued == 0  # decided masks are a person's word now


def test_masks_of_annotators_below_agreement_are_reviewed_first(tmp_path):
    """A verified mask by an annotator whose agreement is below the minimum is doubted, ahead of a failed audit."""
    import numpy as np

    from stages.review import doubted
    from storage.records import MaskRecord
    from storage.rle import encode_masks
    from storage.shards import MaskStore

    m = np.zeros((3, 20, 20), bool)
    for k in range(3):
        m[k, 2 + 5 * k:6 + 5 * k, 2:10] = True
    rles = encode_masks(m)
    recs = [MaskRecord.from_rle("a.png", "m0", rles[0], "manual", 1, annotator="careful", verified=True),
            MaskRecord.from_rle("a.png", "m1", rles[1], "manual", 1, annotator="hasty", verified=True),
            MaskRecord.from_rle("a.png", "m2", rles[2], "manual", 1, annotator="careful", verified=True,
                                origin="prefill_accepted", predicted_iou=0.95,
                                source={"audit": {"passed": False}})]
    store = MaskStore(str(tmp_path / "store"))
    with store.writer(stage="manual", round=1, model_version="m") as w:
        w.add(recs)
        w.image_done("a.png", 3)
        w.commit()
    assert [(r.mask_id, why) for r, why in doubted(store, 1, 0.8, 10)] == [("m2", "audit failed")]
    assert [(r.mask_id, why) for r, why in doubted(store, 1, 0.8, 10, {"hasty"})] == [
        ("m1", "annotator below agreement"), ("m2", "audit failed")]
