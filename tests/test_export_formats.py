"""The formats a team trains from, each proven by the library its users read it with: COCO polygons through
pycocotools, YOLO segmentation through supervision's YOLO loader, the Hugging Face folder through `datasets`,
WebDataset shards through `webdataset`. Round trips compare every mask by IoU and print the floor."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.integrations.synth import write_synthetic_dataset
from storage.coco import read_coco, segmentation_rle
from storage.exports import ExportFilters, export, read_index
from storage.images import ImageSource
from storage.records import MaskRecord, make_mask_id
from storage.shards import MaskStore
from tests.export_fixtures import build_store


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores: the export tests' small one (rectangles and ellipses, manual and automatic rounds, a concept
    phrase on some masks) and one of synthetic scenes (rings with holes, parts, touching objects)."""
    root = tmp_path_factory.mktemp("formats")
    store, source, _ = build_store(root / "small")
    write_synthetic_dataset(root / "scenes", n_images=4, seed=3, size=128)
    scenes_store = MaskStore(str(root / "scenes" / "store"))
    with scenes_store.writer("manual", 0, None) as w:
        for im in read_coco(root / "scenes" / "annotations.json"):
            rles = [segmentation_rle(a["segmentation"], im.height, im.width) for a in im.annotations]
            w.add([MaskRecord.from_rle(im.file_name, make_mask_id(im.file_name, a["id"]), rle, "manual", 0,
                                       verified=True, prompt_text="ring" if k % 3 == 0 else None)
                   for k, (a, rle) in enumerate(zip(im.annotations, rles))])
            w.image_done(im.file_name, len(rles))
    return {"small": (store, source), "scenes": (scenes_store, ImageSource(str(root / "scenes" / "images")))}


def _truth(store: MaskStore) -> dict[str, np.ndarray]:
    """mask_id -> (H, W) bool, as the store holds it."""
    return {r["mask_id"]: mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle"]}).astype(bool)
            for r in store.read_table(columns=["mask_id", "height", "width", "rle"]).to_pylist()}


@pytest.mark.parametrize("which", ["small", "scenes"])
def test_coco_polygons_read_back_by_pycocotools_match_the_masks(stores, tmp_path, which):
    store, _ = stores[which]
    out = tmp_path / "poly"
    summary = export("coco-polygons", store, str(out))
    coco = COCO(str(out / "instances_all.json"))
    truth = _truth(store)
    ious = [_iou(coco.annToMask(a).astype(bool), truth[a["sa_engine"]["mask_id"]]) for a in coco.anns.values()]
    print(f"coco-polygons {which}: {len(ious)} masks, IoU mean {np.mean(ious):.4f} min {min(ious):.4f}")
    assert len(ious) == len(truth) and all(isinstance(a["segmentation"], list) for a in coco.anns.values())
    assert np.mean(ious) >= 0.97 and min(ious) >= 0.9
    assert summary["polygon_iou"]["masks"] == len(ious)
    assert abs(summary["polygon_iou"]["mean"] - np.mean(ious)) < 1e-3  # the summary says what a reader gets
    # AP of the RLE export's masks scored against the polygon export as ground truth: the same objects
    export("coco", store, str(tmp_path / "rle"))
    rle_doc = json.loads((tmp_path / "rle" / "instances_all.json").read_text())
    dets = [{**a, "score": 1.0} for a in rle_doc["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.params.useCats = 0
        ev.evaluate(), ev.accumulate(), ev.summarize()
    print(f"coco-polygons {which}: AP of the RLE masks against the polygons {ev.stats[0]:.4f}")
    assert ev.stats[0] >= 0.95


def test_a_coarse_tolerance_is_measured_not_hidden(stores, tmp_path):
    store, _ = stores["scenes"]
    fine = export("coco-polygons", store, str(tmp_path / "fine"))["polygon_iou"]
    coarse = export("coco-polygons", store, str(tmp_path / "coarse"), tolerance_px=3.0)["polygon_iou"]
    assert coarse["mean"] < fine["mean"] and coarse["below_0_9"] > fine["below_0_9"]


def test_yolo_labels_read_by_supervision_match_the_masks(stores, tmp_path):
    import supervision as sv

    store, source = stores["scenes"]
    out = tmp_path / "yolo"
    summary = export("yolo-seg", store, str(out), source, splits={"train": 0.5, "val": 0.5})
    names = json.loads((out / "images.json").read_text())
    rows: dict[str, list[dict]] = {}
    for r in store.read_table(columns=["image_id", "mask_id", "height", "width", "rle", "prompt_text"]).to_pylist():
        rows.setdefault(r["image_id"], []).append(r)
    ious, seen = [], 0
    for split in ("train", "val"):
        ds = sv.DetectionDataset.from_yolo(images_directory_path=str(out / "images" / split),
                                           annotations_directory_path=str(out / "labels" / split),
                                           data_yaml_path=str(out / "data.yaml"), force_masks=True)
        assert ds.classes == ["object", "ring"]
        for path, image, det in ds:
            mine = rows[names[Path(path).stem]]  # the label lines are the image's masks in store order
            assert len(det) == len(mine) and image.shape[:2] == (mine[0]["height"], mine[0]["width"])
            for mask, cls, r in zip(det.mask, det.class_id, mine):
                truth = mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle"]}).astype(bool)
                ious.append(_iou(mask, truth))
                assert ds.classes[cls] == (r["prompt_text"] or "object")
            seen += 1
    print(f"yolo-seg via supervision: {len(ious)} masks, IoU mean {np.mean(ious):.4f} min {min(ious):.4f}")
    assert seen == summary["images"] == len(rows) and np.mean(ious) >= 0.97 and min(ious) >= 0.85


def test_the_hf_folder_loads_with_datasets_images_and_masks_intact(stores, tmp_path):
    import datasets

    store, source = stores["small"]
    out = tmp_path / "hf"
    summary = export("hf", store, str(out), source, splits={"train": 0.6, "val": 0.4},
                     filters=ExportFilters(verified_only=True), images_per_tar=2)
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf-cache"))  # its own cache: datasets
    # keys a local folder by its file names, so a shared cache can hand back an earlier export of the same names
    assert set(loaded) == {"train", "val"}
    assert sum(len(loaded[s]) for s in loaded) == summary["images"]
    truth = _truth(store)
    verified = {r["mask_id"] for r in store.read_table(columns=["mask_id", "verified"]).to_pylist() if r["verified"]}
    n = 0
    for split in loaded:
        for row in loaded[split]:
            img = source.load(source.ref(row["image_id"])).pixels
            assert np.array_equal(np.asarray(row["image"].convert("RGB")), img)  # the Image feature decodes
            for obj in row["objects"]:
                mask = mask_utils.decode({"size": obj["segmentation"]["size"],
                                          "counts": obj["segmentation"]["counts"].encode()}).astype(bool)
                assert np.array_equal(mask, truth[obj["mask_id"]]) and obj["verified"]
                n += 1
    assert n == summary["masks"] == len(verified)
    assert "configs:" in (out / "README.md").read_text()  # the card the Hub reads


def test_webdataset_shards_stream_every_sample_and_stay_under_their_size(stores, tmp_path):
    import webdataset as wds

    store, source = stores["scenes"]
    out = tmp_path / "wds"
    summary = export("webdataset", store, str(out), source, shard_mb=0.02)  # ~20 KB: several shards
    files = read_index(str(out))["files"]
    assert len(files) > 1
    for f in files:  # bounded: a shard passes the limit only when one sample alone does
        assert f["bytes"] <= 0.02 * 2 ** 20 + 64 * 1024 or f["images"] == 1
    truth = _truth(store)
    urls = [str(out / f["path"]) for f in files]
    samples = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        doc = sample["json"]
        image = sample.get("png", sample.get("jpg"))
        assert image.shape[:2] == (doc["image"]["height"], doc["image"]["width"])
        for ann in doc["annotations"]:
            mask = mask_utils.decode({"size": ann["segmentation"]["size"],
                                      "counts": ann["segmentation"]["counts"].encode()}).astype(bool)
            assert np.array_equal(mask, truth[ann["sa_engine"]["mask_id"]])
        samples += 1
    assert samples == summary["images"] == 4


def test_every_format_writes_to_s3_and_refuses_an_existing_output(stores, s3_bucket, tmp_path):
    from storage.exports import OutputExistsError

    store, source = stores["small"]
    for fmt in ("coco-polygons", "yolo-seg", "hf", "webdataset"):
        uri = f"{s3_bucket.uri}/{fmt}"
        summary = export(fmt, store, uri, source, s3_endpoint_url=s3_bucket.endpoint_url)
        index = read_index(uri, s3_endpoint_url=s3_bucket.endpoint_url)
        assert index["format"] == fmt and index["masks"] == summary["masks"] > 0
        with pytest.raises(OutputExistsError):
            export(fmt, store, uri, source, s3_endpoint_url=s3_bucket.endpoint_url)


@pytest.mark.parametrize("fmt", ["coco", "coco-polygons", "yolo-seg"])
def test_an_export_imports_back_as_verified_masks_with_their_origin(stores, tmp_path, fmt):
    """A team's earlier labels (COCO RLE or polygons, YOLO segmentation) come in as verified masks of origin
    "imported" with where they came from; importing twice replaces, never duplicates; the masks match."""
    from storage.imports import import_coco, import_yolo

    store, source = stores["scenes"]
    export(fmt, store, str(tmp_path / "out"), source)
    target = MaskStore(str(tmp_path / "imported"))
    for _ in range(2):
        summary = (import_yolo(target, source, tmp_path / "out") if fmt == "yolo-seg" else
                   import_coco(target, source, tmp_path / "out" / "instances_all.json"))
    rows = target.read_table().to_pylist()
    assert summary["skipped"] == [] and len(rows) == summary["masks"] == store.read_table().num_rows
    assert {(r["stage"], r["origin"], r["verified"]) for r in rows} == {("manual", "imported", True)}
    assert all(json.loads(r["source"])["format"] == ("yolo-seg" if fmt == "yolo-seg" else "coco") for r in rows)
    assert {r["prompt_text"] for r in rows} == {None, "ring"}  # categories and classes come back as phrases
    assert target.images_done("manual") == {r.image_id for r in source.list()}
    truth: dict[str, list[np.ndarray]] = {}
    for r in store.read_table().to_pylist():
        truth.setdefault(r["image_id"], []).append(
            mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle"]}).astype(bool))
    ious = [max(_iou(mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle"]}).astype(bool), t)
                for t in truth[r["image_id"]]) for r in rows]
    print(f"{fmt} import: {len(ious)} masks, IoU to the originals mean {np.mean(ious):.4f} min {min(ious):.4f}")
    assert np.mean(ious) >= 0.97 and min(ious) >= 0.85


def test_labels_for_images_the_source_lacks_are_skipped_in_one_line(stores, tmp_path):
    from storage.imports import import_coco

    store, source = stores["small"]
    doc = {"images": [{"id": 1, "file_name": "elsewhere.png", "height": 4, "width": 4}],
           "annotations": [{"id": 1, "image_id": 1, "segmentation": [[0, 0, 3, 0, 3, 3]], "category_id": 1}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    summary = import_coco(MaskStore(str(tmp_path / "s")), source, tmp_path / "c.json")
    assert summary["masks"] == 0 and summary["skipped"] == [{"thing": "elsewhere.png",
                                                             "reason": "not an image of the image source"}]
