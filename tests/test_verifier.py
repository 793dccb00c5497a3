"""model/verifier.py: the mask verifier's features, its fit, its threshold rule and the exhaustivity estimate."""
from __future__ import annotations

import numpy as np
import pytest

from engine.integrations.synth import make_scene, scene_rng
from model.calibration import loosest_threshold
from model.verifier import FEATURES, MaskVerifier, auc, mask_features, uncovered_objectness
from storage.rle import encode_masks


def _scene():
    image, masks, _ = make_scene(scene_rng(3, 1), 128)
    return image, masks


def test_features_tell_an_object_from_a_blob_and_see_duplicates():
    image, masks = _scene()
    obj = masks[int(np.argmax(masks.reshape(len(masks), -1).sum(1)))]
    blob = np.zeros_like(obj)
    ys, xs = np.nonzero(obj)
    blob[ys.min():ys.min() + 20, 5:25] = True  # a square that ignores the image
    rles = encode_masks(np.stack([obj, blob, obj]))
    f = mask_features(image, rles, [0.9, 0.9, 0.9], [0.95, 0.95, 0.95])
    col = {name: f[:, i] for i, name in enumerate(FEATURES)}
    assert f.shape == (3, len(FEATURES)) and np.isfinite(f).all()
    assert col["colour_gap"][0] > col["colour_gap"][1] and col["interior_spread"][0] < col["interior_spread"][1]
    assert col["overlap"][0] == col["overlap"][2] == 1.0 and col["overlap"][1] < 1.0
    assert col["log_area"][0] == pytest.approx(np.log(obj.sum() / obj.size))
    assert mask_features(image, [], [], []).shape == (0, len(FEATURES))


def test_the_verifier_learns_a_rule_it_was_not_told():
    """Decisions that depend on two features (not on pred_iou): the fitted verifier ranks held-out masks by them
    (AUC near 1) where pred_iou alone is at chance."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, len(FEATURES)))
    accepted = (x[:, 5] - 0.5 * x[:, 7] ** 2 + 0.3 * rng.normal(size=600)) > 0
    v = MaskVerifier.fit(x[:400], accepted[:400])
    assert auc(v.score(x[400:]), accepted[400:]) > 0.9
    assert abs(auc(x[400:, 0], accepted[400:]) - 0.5) < 0.1
    with pytest.raises(ValueError, match="needs accepted and rejected"):
        MaskVerifier.fit(x[:10], np.ones(10, bool))


def test_verifier_round_trips_and_its_version_names_its_numbers(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, len(FEATURES)))
    v = MaskVerifier.fit(x, x[:, 0] > 0)
    version = v.save(tmp_path / "verifier.json")
    back = MaskVerifier.load(tmp_path / "verifier.json")
    assert back.version == version == v.version and version.startswith("verifier-")
    assert np.allclose(back.score(x), v.score(x))
    assert MaskVerifier.fit(x, x[:, 1] > 0).version != version


def test_threshold_rule_and_auc_on_hand_examples():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    good = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
    t, reached = loosest_threshold(scores, good, target_precision=0.5, confidence=0.9, min_kept=2)
    assert reached and t == 0.2  # everything kept still has a lower bound above 0.5
    t, reached = loosest_threshold(scores, good, target_precision=0.99, confidence=0.9, min_kept=2)
    assert not reached and t in scores
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert auc(np.array([0.5, 0.5]), np.array([0, 1], bool)) == 0.5 and auc(np.ones(3), np.ones(3, bool)) is None


def test_uncovered_objectness_is_the_share_of_object_like_area_left_uncovered():
    a = np.zeros((1, 10, 10), bool)
    a[0, :5] = True
    b = np.zeros((1, 10, 10), bool)
    b[0, 5:] = True
    rles = encode_masks(np.concatenate([a, b]))
    assert uncovered_objectness(rles, [0.9, 0.9], np.array([True, False])) == pytest.approx(0.5)
    assert uncovered_objectness(rles, [0.9, 0.1], np.array([True, False])) == 0.0  # b is not object-like
    assert uncovered_objectness(rles, [0.9, 0.9], np.array([True, True])) == 0.0


def test_the_verifier_is_promoted_only_when_it_beats_the_predicted_iou_on_held_out_decisions():
    from model.calibration import CalibrationSamples, CalibrationSettings, fit_verifier

    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, len(FEATURES)))
    x[:, 0] = rng.random(400)  # pred_iou
    settings = CalibrationSettings(target_precision=0.8, precision_iou=0.5, default_pred_iou_thresh=0.9,
                                   default_stability_score_thresh=0.9, min_samples=50, min_kept=5)
    by_colour = CalibrationSamples(x[:, 0], x[:, 1], (x[:, 5] > 0).astype(float), features=x)
    verifier, info = fit_verifier(by_colour, settings)
    assert verifier is not None and info["version"] == verifier.version
    assert info["held_out_auc"] > 0.9 and abs(info["pred_iou_auc"] - 0.5) < 0.2 and info["reached"]
    by_score = CalibrationSamples(x[:, 0], x[:, 1], (x[:, 0] > 0.5).astype(float), features=x)
    verifier, info = fit_verifier(by_score, settings)  # the predicted IoU already ranks these perfectly
    assert verifier is None and info["pred_iou_auc"] == 1.0 and "not promoted" in info["reason"]
    few = CalibrationSamples(x[:10, 0], x[:10, 1], (x[:10, 5] > 0).astype(float), features=x[:10])
    assert fit_verifier(few, settings)[0] is None
