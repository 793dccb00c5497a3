"""Evaluation: SAM's point protocol (mIoU at 1/3/5 clicks), box mIoU, and COCOeval AP/AR of automatic masks.

Point protocol, per ground-truth mask: click 1 at the interior point farthest from the boundary,
decoded with 3 outputs. Nested ground truth (an object and its parts are separate entries) makes a
single click ambiguous, so two 1-click figures are reported: `oracle` (the best of the 3 outputs
against the ground truth, SAM's paper) and `pred` (the output with the highest predicted IoU, what
a tool shows). Each next click goes to the deepest point of the larger error region of the shown
mask; clicks 2+ are decoded with the single-output token and the previous low-res logits as mask
prompt, as in SAM. Box mIoU: the ground truth's bounding box, single output.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.amg import AmgParams, generate_masks
from model.clicks import first_click, next_click
from model.iou import mask_iou, pairwise_mask_iou
from model.segmenter import Segmenter
from storage.coco import read_coco, segmentation_rle
from storage.images import decode_image


def mask_boxes_xyxy(gt: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) XYXY pixel boxes (x1, y1 exclusive, like COCO's x + w)."""
    out = np.zeros((len(gt), 4))
    for i, m in enumerate(gt):
        ys, xs = np.nonzero(m)
        out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


@torch.no_grad()
def click_eval_image(seg: Segmenter, image: np.ndarray, gt: np.ndarray, clicks: int = 5) -> dict[str, np.ndarray]:
    """One image, all its (N, H, W) ground-truth masks at once.

    Returns per-mask IoU arrays: "oracle@1", "pred@1", "clicks@k" for k = 1..clicks (k = 1 is the
    shown, pred-selected mask), and "box".
    """
    gt = gt[gt.reshape(len(gt), -1).any(1)]
    out: dict[str, np.ndarray] = {}
    if len(gt) == 0:
        return out
    emb = seg.embed([image])[0]
    n = len(gt)
    pts = np.array([[first_click(m)] for m in gt], dtype=np.float64)
    lab = np.ones((n, 1), dtype=np.int64)
    p = seg.predict(emb, pts, lab, multimask=True)
    ious = mask_iou(p.masks.numpy(), gt[:, None])
    shown_idx = p.iou_pred.argmax(1).numpy()
    out["oracle@1"] = ious.max(1)
    out["pred@1"] = ious[np.arange(n), shown_idx]
    out["clicks@1"] = out["pred@1"]
    shown = p.masks.numpy()[np.arange(n), shown_idx]
    logits = p.low_res_logits[torch.arange(n), torch.as_tensor(shown_idx)][:, None]
    for k in range(2, clicks + 1):
        new_pts = np.zeros((n, 1, 2))
        new_lab = np.full((n, 1), -1, dtype=np.int64)  # -1: padding for masks already exact
        for i in range(n):
            c = next_click(shown[i], gt[i])
            if c is not None:
                new_pts[i, 0] = c[:2]
                new_lab[i, 0] = c[2]
        pts, lab = np.concatenate([pts, new_pts], 1), np.concatenate([lab, new_lab], 1)
        p = seg.predict(emb, pts, lab, mask_input=logits, multimask=False)
        shown = p.masks.numpy()[:, 0]
        logits = p.low_res_logits
        out[f"clicks@{k}"] = mask_iou(shown, gt)
    pb = seg.predict(emb, boxes=mask_boxes_xyxy(gt), multimask=False)
    out["box"] = mask_iou(pb.masks.numpy()[:, 0], gt)
    return out


def click_eval(seg: Segmenter, images: list[np.ndarray], gts: list[np.ndarray], clicks: int = 5,
               max_objects: int | None = None, per_mask: bool = False) -> dict[str, float]:
    """mIoU over all ground-truth masks of all images (see module doc). Keys: oracle@1, pred@1,
    clicks@k (k = 1..clicks), box, n_masks; with `per_mask`, also per_mask: {key: [IoU of each ground-truth
    mask, in image then annotation order]} (two models on one holdout can then be compared mask by mask)."""
    acc: dict[str, list[np.ndarray]] = {}
    seen = 0
    for image, gt in zip(images, gts):
        if max_objects is not None and seen >= max_objects:
            break
        if max_objects is not None:
            gt = gt[: max_objects - seen]
        res = click_eval_image(seg, image, gt, clicks)
        for k, v in res.items():
            acc.setdefault(k, []).append(v)
        seen += len(res.get("box", []))
    out = {k: float(np.concatenate(v).mean()) for k, v in acc.items()}
    if per_mask:
        out["per_mask"] = {k: [round(float(x), 5) for x in np.concatenate(v)] for k, v in acc.items()}
    out["n_masks"] = seen
    return out


def match_rates(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                thresholds: tuple[float, ...] = (0.5, 0.75)) -> dict:
    """How much of the ground truth a set of masks covers, and how much of it is right.

    pred, truth: image id -> (N, H, W) bool masks of that image (same size per image). For each threshold t:
    `recall_<t>` = share of truth masks that some predicted mask of their image overlaps at IoU >= t;
    `precision_<t>` = share of predicted masks that overlap some truth mask at IoU >= t (t as two digits:
    recall_50). Images only in `truth` count toward recall, images only in `pred` toward precision.
    Returns the rates (None when there is nothing to divide by) and the counts truth_masks, pred_masks.
    """
    best_for_truth, best_for_pred = [], []
    for image_id in set(pred) | set(truth):
        p = pred.get(image_id, np.zeros((0, 1, 1), bool))
        t = truth.get(image_id, np.zeros((0, 1, 1), bool))
        if len(p) and len(t) and p.shape[1:] != t.shape[1:]:
            raise ValueError(f"match_rates: {image_id}: masks are {p.shape[2]}x{p.shape[1]}, "
                             f"truth {t.shape[2]}x{t.shape[1]}")
        ious = pairwise_mask_iou(p, t) if len(p) and len(t) else np.zeros((len(p), len(t)))
        best_for_truth.append(ious.max(0) if len(p) else np.zeros(len(t)))
        best_for_pred.append(ious.max(1) if len(t) else np.zeros(len(p)))
    bt = np.concatenate(best_for_truth) if best_for_truth else np.zeros(0)
    bp = np.concatenate(best_for_pred) if best_for_pred else np.zeros(0)
    out: dict = {"truth_masks": int(len(bt)), "pred_masks": int(len(bp))}
    for thr in thresholds:
        tag = f"{round(thr * 100):02d}"
        out[f"recall_{tag}"] = round(float((bt >= thr).mean()), 4) if len(bt) else None
        out[f"precision_{tag}"] = round(float((bp >= thr).mean()), 4) if len(bp) else None
    return out


def coco_mask_ap(gt_rles: dict[str, list[dict]], pred: dict[str, list[tuple[dict, float]]],
                 sizes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """COCOeval (segm) of automatic masks against ground truth, class-agnostic.

    gt_rles: image_id -> COCO RLEs; pred: image_id -> [(rle, score)]; sizes: image_id -> (H, W).
    Returns AP, AP50, AP75, AR@1, AR@10, AR@100 (pycocotools' definitions and detection limits).
    """

    ids = {img: i + 1 for i, img in enumerate(sorted(sizes))}

    def norm(rle: dict) -> dict:
        c = rle["counts"]
        return {"size": list(rle["size"]), "counts": c.decode() if isinstance(c, bytes) else c}


    images = [{"id": ids[k], "height": h, "width": w} for k, (h, w) in sizes.items()]
    anns, dets = [], []
    for k, rles in gt_rles.items():
        for r in rles:
            r = norm(r)
            anns.append({"id": len(anns) + 1, "image_id": ids[k], "category_id": 1, "segmentation": r,
                         "area": float(mask_utils.area(r)), "bbox": list(mask_utils.toBbox(r)), "iscrowd": 0})
    for k, items in pred.items():
        for r, s in items:
            dets.append({"image_id": ids[k], "category_id": 1, "segmentation": norm(r), "score": float(s)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not dets:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR@1": 0.0, "AR@10": 0.0, "AR@100": 0.0}
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"AP": float(s[0]), "AP50": float(s[1]), "AP75": float(s[2]),
            "AR@1": float(s[6]), "AR@10": float(s[7]), "AR@100": float(s[8])}


def load_coco_folder(folder: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[list[dict]]]:
    """A synth-style folder (images/ + annotations.json, COCO RLE) -> (file names, images (H, W, 3)
    uint8, masks (N, H, W) bool, RLEs) per image, in annotation-file order."""

    root = Path(folder)
    ann_file = root / "annotations.json"
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: not found (expected a folder with images/ and annotations.json)")
    names, images, masks, rles = [], [], [], []
    for info in read_coco(ann_file):
        path = root / "images" / info.file_name
        if not path.is_file():
            path = root / info.file_name
        img = decode_image(path.read_bytes(), str(path))  # the stages' decoder: the same pixels everywhere
        h, w = img.shape[:2]
        rl = [segmentation_rle(a["segmentation"], h, w) for a in info.annotations]
        m = np.stack([mask_utils.decode(r).astype(bool) for r in rl]) if rl else np.zeros((0, h, w), bool)
        names.append(info.file_name)
        images.append(img)
        masks.append(m)
        rles.append(rl)
    return names, images, masks, rles


# The automatic masks that AP/AR score are filtered this loosely everywhere the engine reports AP (`sa-engine eval`,
# the round loop's holdout evaluation, the report): COCOeval ranks by predicted IoU anyway, and SAM's own 0.88 /
# 0.95 keep nothing of a young model (AP 0.0 where the same masks at these thresholds score 0.13).
EVAL_PRED_IOU_THRESH, EVAL_STABILITY_SCORE_THRESH = 0.5, 0.8


def evaluate_folder(checkpoint: str, folder: str, clicks: int = 5, max_objects: int | None = None,
                    amg_points_per_side: int | None = 16, pred_iou_thresh: float = EVAL_PRED_IOU_THRESH,
                    stability_score_thresh: float = EVAL_STABILITY_SCORE_THRESH, per_mask: bool = False) -> dict:
    """The `sa-engine eval` table: click mIoU, box mIoU and (optionally) automatic-mask AP/AR
    (with `amg_masks`, how many automatic masks passed the filters, and the two thresholds used);
    per_mask: see click_eval."""
    seg = Segmenter.new("compact") if checkpoint == "compact" else Segmenter.load(checkpoint)
    names, images, masks, rles = load_coco_folder(folder)
    table: dict = {"model_version": seg.model_version, "images": len(images)}
    table.update(click_eval(seg, images, masks, clicks=clicks, max_objects=max_objects, per_mask=per_mask))
    if amg_points_per_side:

        params = AmgParams(points_per_side=amg_points_per_side, pred_iou_thresh=pred_iou_thresh,
                           stability_score_thresh=stability_score_thresh)
        preds = {}
        for name, image in zip(names, images):
            preds[name] = [(m.rle, m.predicted_iou) for m in generate_masks(seg, image, params)]
        sizes = {n: im.shape[:2] for n, im in zip(names, images)}
        table["amg_masks"] = sum(len(v) for v in preds.values())
        table["amg_pred_iou_thresh"], table["amg_stability_score_thresh"] = pred_iou_thresh, stability_score_thresh
        table.update(coco_mask_ap(dict(zip(names, rles)), preds, sizes))
    return table


def evaluate_checkpoint(checkpoint: str | None, images_dir: str, annotations_json: str,
                        clicks: tuple[int, ...] = (1, 3, 5), max_objects: int | None = 200,
                        amg_points_per_side: int | None = 16) -> dict:
    """The round loop's holdout evaluation. images_dir holds the files named in annotations_json.

    Keys: miou@k for k in `clicks` (what the tool shows: the highest-predicted-IoU output for click 1),
    oracle@1 (best of 3, SAM's paper), box_miou, n_masks, and the automatic masks' AP/AR (COCOeval);
    per_mask: the IoU of every holdout mask for the click and box metrics (the promotion gate pairs them).
    """
    folder = Path(images_dir).parent
    if Path(annotations_json).resolve() != (folder / "annotations.json").resolve():
        raise ValueError(f"{annotations_json}: the holdout's annotations must sit beside its images/ folder "
                         f"as {folder / 'annotations.json'}")
    table = evaluate_folder(checkpoint or "compact", str(folder), clicks=max(clicks), max_objects=max_objects,
                            amg_points_per_side=amg_points_per_side, pred_iou_thresh=EVAL_PRED_IOU_THRESH,
                            stability_score_thresh=EVAL_STABILITY_SCORE_THRESH,
                            per_mask=True)
    out = {f"miou@{k}": table[f"clicks@{k}"] for k in clicks}
    out.update({"oracle@1": table["oracle@1"], "box_miou": table["box"], "n_masks": table["n_masks"],
                "model_version": table["model_version"]})
    masks = table["per_mask"]  # the same holdout masks in the same order for every model: pairs
    out["per_mask"] = {**{f"miou@{k}": masks[f"clicks@{k}"] for k in clicks}, "oracle@1": masks["oracle@1"],
                       "box_miou": masks["box"]}
    out.update({k: v for k, v in table.items() if k.startswith(("AP", "AR")) or k == "amg_masks"})
    return out
