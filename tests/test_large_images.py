"""Photos larger than `images.max_side` (most camera photos): the model sees the downscaled copy, the masks keep
the file's size through the automatic stage, the shards and both exports (decoded by pycocotools), and a
person's masks drawn on a downscaled task come back at the file's size."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from engine.integrations import runtime
from engine.integrations.config import load_config
from engine.integrations.labelling import at_full_size
from engine.integrations.labelstudio import PulledAnnotation, PulledRegion, PullResult
from engine.integrations.synth import make_scene, scene_rng
from stages.manual import records_from_pull
from storage.exports import ExportFilters, export, iter_sa1b_tar, read_index

SIZES = {"square.png": (2048, 2048), "wide.png": (1500, 4000)}  # (H, W)


def write_photos(folder: Path) -> None:
    folder.mkdir(parents=True)
    for k, (name, (h, w)) in enumerate(SIZES.items()):
        image = make_scene(scene_rng(31, k), 256)[0]
        Image.fromarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)).save(folder / name)


@pytest.mark.ray
def test_auto_stage_and_exports_keep_every_mask_at_the_file_size(ray_cluster, tmp_path):
    from stages.auto import run_auto_stage

    write_photos(tmp_path / "photos")
    cfg_file = tmp_path / "engine.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "run"), "images": {"source": str(tmp_path / "photos"), "max_side": 256},
        "ray": {"num_cpus": 2, "cpus_per_actor": 0.5},
        "stages": {"auto": {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                            "min_mask_region_area": 0, "num_actors": 1}}}))
    cfg = load_config(cfg_file)
    summary = run_auto_stage(cfg, 1, None, show_progress=False)
    assert summary.images == 2 and summary.masks > 0
    store = runtime.mask_store(cfg)
    rows = store.read_table(columns=["image_id", "height", "width", "rle", "bbox"]).to_pylist()
    for row in rows:
        h, w = SIZES[row["image_id"]]
        assert (row["height"], row["width"]) == (h, w)
        assert mask_utils.decode({"size": [h, w], "counts": row["rle"]}).shape == (h, w)
        assert row["bbox"][0] + row["bbox"][2] <= w and row["bbox"][1] + row["bbox"][3] <= h

    export("sa1b", store, str(tmp_path / "sa1b"), runtime.image_source(cfg), filters=ExportFilters())
    seen = 0
    for entry in read_index(str(tmp_path / "sa1b"))["files"]:
        with open(tmp_path / "sa1b" / entry["path"], "rb") as f:
            for doc, _, _ in iter_sa1b_tar(f):
                assert (doc["image"]["height"], doc["image"]["width"]) in SIZES.values()
                for ann in doc["annotations"]:
                    seg = ann["segmentation"]
                    assert mask_utils.decode({"size": seg["size"], "counts": seg["counts"]}).shape == \
                        (doc["image"]["height"], doc["image"]["width"])
                    seen += 1
    assert seen == len(rows)

    export("coco", store, str(tmp_path / "coco"), filters=ExportFilters())
    (entry,) = [e for e in read_index(str(tmp_path / "coco"))["files"] if e["path"].endswith(".json")]
    coco = json.loads((tmp_path / "coco" / entry["path"]).read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    assert sorted(sizes.values()) == sorted(SIZES.values())
    for ann in coco["annotations"]:
        assert mask_utils.decode(ann["segmentation"]).shape == sizes[ann["image_id"]]


def test_a_persons_mask_on_a_downscaled_task_is_stored_at_the_file_size():
    task_mask = np.zeros((96, 256), bool)  # the task shows wide.png at 256 px
    task_mask[30:60, 100:180] = True
    pull = PullResult(annotations=[PulledAnnotation(
        task_id=1, annotation_id=2, image_id="wide.png", height=96, width=256, annotator="a@b", lead_time_s=4.0,
        updated_at="t", regions=[PulledRegion(region_id="r1", label="object", mask=task_mask)])], problems=[],
        task_ids=[1])
    (rec,) = records_from_pull(pull, 7, 1, "m", full_sizes={"wide.png": SIZES["wide.png"]})
    assert (rec.height, rec.width) == SIZES["wide.png"]
    full = mask_utils.decode(rec.rle).astype(bool)
    assert full.shape == SIZES["wide.png"] and np.array_equal(full, at_full_size(task_mask, SIZES["wide.png"]))
    assert abs(full.mean() - task_mask.mean()) < 0.01  # the same share of the image
