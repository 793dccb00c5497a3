import numpy as np
import pytest
from pycocotools import mask as mask_utils

from engine.integrations.synth import write_synthetic_dataset
from model.evaluate import click_eval, coco_mask_ap, evaluate_folder, load_coco_folder, mask_boxes_xyxy, mask_iou
from model.segmenter import Segmenter


def test_mask_iou_and_boxes():
    a = np.zeros((2, 10, 10), bool)
    a[0, :5] = True
    a[1, 2:4, 3:7] = True
    b = a.copy()
    b[0, :, :5] = True
    assert np.allclose(mask_iou(a, b), [50 / 75, 1.0])
    assert mask_boxes_xyxy(a[1:]).tolist() == [[3, 2, 7, 4]]


def test_coco_ap_is_one_for_ground_truth_and_drops_for_wrong_masks():
    gt = np.zeros((3, 32, 32), bool)
    gt[0, 2:12, 2:12] = True
    gt[1, 15:30, 3:20] = True
    gt[2, 4:10, 20:30] = True
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in gt]
    perfect = coco_mask_ap({"a": rles}, {"a": [(r, 0.9) for r in rles]}, {"a": (32, 32)})
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AR@100"] == pytest.approx(1.0)
    shifted = [mask_utils.encode(np.asfortranarray(np.roll(m, 4, 1).astype(np.uint8))) for m in gt]
    worse = coco_mask_ap({"a": rles}, {"a": [(r, 0.9) for r in shifted]}, {"a": (32, 32)})
    assert worse["AP"] < 0.5


def test_eval_on_a_synth_folder(tmp_path):
    write_synthetic_dataset(tmp_path / "d", n_images=2, seed=7, size=96)
    names, images, masks, rles = load_coco_folder(str(tmp_path / "d"))
    assert len(images) == 2 and masks[0].shape[1:] == (96, 96) and len(rles[0]) == len(masks[0])
    seg = Segmenter.new("compact")
    res = click_eval(seg, images, masks, clicks=3, max_objects=4)
    assert res["n_masks"] == 4
    for k in ("oracle@1", "pred@1", "clicks@2", "clicks@3", "box"):
        assert 0.0 <= res[k] <= 1.0
    assert res["oracle@1"] >= res["pred@1"]
    table = evaluate_folder("compact", str(tmp_path / "d"), clicks=1, max_objects=3, amg_points_per_side=4)
    assert "AP" in table and table["images"] == 2


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        load_coco_folder(str(tmp_path))


def test_match_rates_count_known_overlaps_against_pycocotools():
    """Recall and precision at IoU 0.5 / 0.75 from known masks; the IoUs agree with pycocotools'."""
    from pycocotools import mask as mask_utils

    from model.evaluate import match_rates

    truth = np.zeros((3, 40, 60), bool)
    truth[0, 0:10, 0:10] = truth[1, 20:30, 0:20] = truth[2, 5:35, 40:60] = True
    pred = np.zeros((3, 40, 60), bool)
    pred[0] = truth[0]                      # exact
    pred[1, 20:30, 4:20] = True             # 160 of 200: IoU 0.8
    pred[2, 5:35, 48:60] = True             # 360 of 600: IoU 0.6
    enc = lambda m: mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))  # noqa: E731
    coco = np.asarray(mask_utils.iou(enc(pred), enc(truth), [0, 0, 0])).max(1)
    assert np.allclose(coco, [1.0, 0.8, 0.6])
    extra = np.zeros((1, 8, 8), bool)
    extra[0, :2, :2] = True
    out = match_rates({"a": pred, "b": extra}, {"a": truth, "c": np.ones((2, 8, 8), bool)})
    assert out["truth_masks"] == 5 and out["pred_masks"] == 4
    assert out["recall_50"] == 3 / 5 and out["recall_75"] == 2 / 5
    assert out["precision_50"] == 3 / 4 and out["precision_75"] == 2 / 4


def test_click_scores_are_pycocotools_ious_of_the_models_own_answers(fitted_compact):
    """Issue 31.14: `click_eval`'s oracle@1 and pred@1 are the means of pycocotools' IoU between the model's
    own answers to the first click (all 3, and the one it ranks first) and each truth mask, and they rank a
    trained model above an untrained one (a constant or mis-paired score fails here)."""
    from pycocotools import mask as mask_utils

    from model.clicks import first_click

    seg, scenes = fitted_compact
    images, gts = [s[0] for s in scenes[:2]], [s[1] for s in scenes[:2]]
    oracle, shown = [], []
    for image, gt in zip(images, gts):
        gt = gt[gt.reshape(len(gt), -1).any(1)]
        emb = seg.embed([image])[0]
        for m in gt:
            p = seg.predict(emb, np.array([[first_click(m)]], np.float64), np.ones((1, 1), np.int64), multimask=True)
            answers = p.masks.numpy()[0]  # (3, H, W)
            truth = mask_utils.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))
            ious = mask_utils.iou(mask_utils.encode(np.asfortranarray(answers.transpose(1, 2, 0).astype(np.uint8))),
                                  truth, [0])[:, 0]
            oracle.append(ious.max())
            shown.append(ious[int(p.iou_pred[0].argmax())])
    res = click_eval(seg, images, gts, clicks=1)
    assert res["n_masks"] == len(shown)
    assert abs(res["oracle@1"] - np.mean(oracle)) < 1e-6 and abs(res["pred@1"] - np.mean(shown)) < 1e-6
    fresh = click_eval(Segmenter.new("compact", seed=0), images, gts, clicks=1)["pred@1"]
    print(f"pred@1 trained {res['pred@1']:.3f}, untrained {fresh:.3f}")
    assert res["pred@1"] > fresh + 0.1


def test_eval_max_objects_caps_the_round_loops_holdout_evaluation(tmp_path):
    """`eval.max_objects` is read by the round loop's holdout evaluation (it was documented and did nothing)."""
    from engine.integrations.config import load_config
    from engine.rounds import default_evaluate

    write_synthetic_dataset(tmp_path / "h", n_images=2, seed=7, size=64)
    cfg = load_config(None, {"workdir": str(tmp_path), "images.holdout_source": str(tmp_path / "h" / "images"),
                             "images.holdout_ground_truth": str(tmp_path / "h" / "annotations.json"),
                             "eval.max_objects": 3, "eval.clicks": [1]})
    assert default_evaluate(cfg, None)["n_masks"] == 3
