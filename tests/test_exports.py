"""SA-1B and COCO exports: verified with pycocotools, round-tripped, filtered, atomic, refusing bad input."""
from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from storage import exports
from storage.exports import (EmptySelectionError, ExportFilters, OutputExistsError, assign_splits, export_coco,
                             export_sa1b, iter_sa1b_tar, parse_splits, read_index, sa1b_to_records)
from storage.shards import CorruptShardError
from tests.export_fixtures import build_store
from tests.output import last_json


@pytest.fixture(scope="module")
def engine_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("exportdata")
    store, source, records = build_store(root)
    return store, source, records, root


def _store_masks(store) -> dict[str, dict]:
    """mask_id -> store row (every column), as the store reads it back."""
    return {row["mask_id"]: row for row in store.read_table().to_pylist()}


def _tar_docs(out: Path) -> list[tuple[dict, str, bytes]]:
    docs = []
    for entry in read_index(str(out))["files"]:
        with open(out / entry["path"], "rb") as f:
            docs.extend(iter_sa1b_tar(f))
    return docs


# ---------------------------------------------------------------------------------------------- SA-1B


def test_sa1b_annotations_decode_bit_for_bit_and_round_trip(engine_data, tmp_path):
    store, source, records, root = engine_data
    out = tmp_path / "sa1b"
    summary = export_sa1b(store, str(out), source, images_per_tar=3)
    rows = _store_masks(store)
    assert summary["masks"] == len(rows) == len(records)
    assert summary["images"] == len({r.image_id for r in records})

    index = read_index(str(out))
    assert [e["path"] for e in index["files"]] == [f"sa_{k:06d}.tar" for k in range(len(index["files"]))]
    assert all(e["images"] <= 3 for e in index["files"])
    docs = _tar_docs(out)
    assert len(docs) == summary["images"]
    refs = {r.image_id: r for r in source.list()}
    seen = set()
    ann_ids = set()
    for doc, name, data in docs:
        img = doc["image"]
        assert set(img) >= {"image_id", "width", "height", "file_name"} and img["file_name"] == name
        image_id = img["sa_engine"]["image_id"]
        # Original PNG bytes travel unchanged (same size, RGB, no rotation).
        assert data == Path(refs[image_id].uri).read_bytes()
        for ann in doc["annotations"]:
            assert set(ann) >= {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score",
                                "crop_box", "point_coords"}
            assert isinstance(ann["segmentation"]["counts"], str)
            row = rows[ann["sa_engine"]["mask_id"]]
            decoded = mask_utils.decode({"size": ann["segmentation"]["size"],
                                         "counts": ann["segmentation"]["counts"].encode()})
            expected = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["rle"]})
            assert decoded.shape == (img["height"], img["width"])
            assert np.array_equal(decoded, expected)
            assert int(mask_utils.area({"size": ann["segmentation"]["size"],
                                        "counts": ann["segmentation"]["counts"].encode()})) == ann["area"]
            seen.add(ann["sa_engine"]["mask_id"])
            ann_ids.add(ann["id"])
    assert seen == set(rows)
    assert len(ann_ids) == len(rows)

    # Round trip: export -> read back -> the same records, field for field.
    back = {r.mask_id: r for doc, _, _ in docs for r in sa1b_to_records(doc)}
    for rec in records:
        got = back[rec.mask_id]
        a, b = rec.to_row(), got.to_row()
        for key in ("predicted_iou", "stability_score", "lead_time_s", "prefill_iou"):
            if a[key] is not None:  # the store keeps float32; JSON carries that float32 value exactly
                a[key] = float(np.float32(a[key]))
                b[key] = float(np.float32(b[key]))
        assert a == b, rec.mask_id


def test_sa1b_splits_filters_and_lineage(engine_data, tmp_path):
    store, source, records, _ = engine_data
    out = tmp_path / "split"
    splits = parse_splits("train=0.5,val=0.5")
    filters = ExportFilters(stage=("auto",), rounds=(1, 2), min_predicted_iou=0.8)
    summary = export_sa1b(store, str(out), source, filters=filters, splits=splits, images_per_tar=2)
    expected = {r.mask_id for r in records
                if r.stage == "auto" and 1 <= r.round <= 2 and np.float32(r.predicted_iou) >= np.float32(0.8)}
    docs = _tar_docs(out)
    got = {a["sa_engine"]["mask_id"] for d, _, _ in docs for a in d["annotations"]}
    assert got == expected and summary["masks"] == len(expected)
    # Split by the stable hash of the image id, tars in one folder per split.
    want_split = dict(zip(sorted({r.image_id for r in records}),
                          assign_splits(sorted({r.image_id for r in records}), splits)))
    for entry in read_index(str(out))["files"]:
        assert entry["path"].startswith(entry["split"] + "/")
        with open(out / entry["path"], "rb") as f:
            for doc, _, _ in iter_sa1b_tar(f):
                assert list(splits)[want_split[doc["image"]["sa_engine"]["image_id"]]] == entry["split"]


def test_split_hash_is_stable_and_proportional():
    ids = [f"img-{i}" for i in range(4000)]
    a = assign_splits(ids, {"train": 0.8, "val": 0.2})
    b = assign_splits(list(reversed(ids)), {"train": 0.8, "val": 0.2})[::-1]
    assert np.array_equal(a, b)  # depends on the id only, not on order or company
    assert abs(float((a == 1).mean()) - 0.2) < 0.03
    with pytest.raises(exports.ExportError, match="sum to"):
        parse_splits("train=0.8,val=0.3")
    with pytest.raises(exports.ExportError, match="NAME=FRACTION"):
        parse_splits("train")


def test_verified_only_and_image_subset(engine_data, tmp_path):
    store, source, records, _ = engine_data
    some = sorted({r.image_id for r in records})[1:3]
    summary = export_coco(store, str(tmp_path / "c"),
                          filters=ExportFilters(verified_only=True, image_ids=frozenset(some)))
    coco = json.loads((tmp_path / "c" / "instances_all.json").read_text())
    got = {a["sa_engine"]["mask_id"] for a in coco["annotations"]}
    assert got == {r.mask_id for r in records if r.verified and r.image_id in some}
    assert summary["images"] == len(some)


# ---------------------------------------------------------------------------------------------- COCO


def test_coco_loads_in_pycocotools_and_evaluates_to_ap_one(engine_data, tmp_path):
    store, source, records, _ = engine_data
    out = tmp_path / "coco"
    summary = export_coco(store, str(out), splits=parse_splits("train=0.7,val=0.3"))
    rows = _store_masks(store)
    total = 0
    for split in ("train", "val"):
        path = out / f"instances_{split}.json"
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(path))
        anns = gt.loadAnns(gt.getAnnIds())
        if not anns:
            continue
        total += len(anns)
        assert gt.getCatIds() == [1] and all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in anns)
        for a in anns:  # masks as the shards hold them
            row = rows[a["sa_engine"]["mask_id"]]
            assert np.array_equal(gt.annToMask(a), mask_utils.decode(
                {"size": [row["height"], row["width"]], "counts": row["rle"]}))
            img = gt.imgs[a["image_id"]]
            assert (img["height"], img["width"]) == (row["height"], row["width"])
        dets = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 1.0}
                for a in anns]
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(dets)
            ev = COCOeval(gt, dt, iouType="segm")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
        assert ev.stats[1] == pytest.approx(1.0)  # AP@.5
    assert total == summary["masks"] == len(rows)
    names = {img["file_name"] for split in ("train", "val")
             for img in json.loads((out / f"instances_{split}.json").read_text())["images"]}
    assert names == {r.key for r in source.list()}  # the key under images.source


# ---------------------------------------------------------------------------------------------- bad input


def test_existing_output_is_refused_then_replaced_without_mixing(engine_data, tmp_path):
    store, source, records, _ = engine_data
    out = tmp_path / "again"
    export_sa1b(store, str(out), source, images_per_tar=1)
    n_before = len(read_index(str(out))["files"])
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_sa1b(store, str(out), source, images_per_tar=1)
    one = sorted({r.image_id for r in records})[:1]
    export_sa1b(store, str(out), source, images_per_tar=1, overwrite=True,
                filters=ExportFilters(image_ids=frozenset(one)))
    index = read_index(str(out))
    assert n_before > 1 and len(index["files"]) == 1
    on_disk = sorted(p.name for p in out.iterdir())
    assert on_disk == sorted([exports.MARKER_NAME, exports.INDEX_NAME, "sa_000000.tar"])
    assert not list(tmp_path.glob(".again.*"))  # no staging or old folders left behind
    # A folder that is not an export of ours is never replaced, even with --overwrite.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match="not an sa-engine export"):
        export_coco(store, str(foreign), overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_filter_selecting_nothing_writes_nothing(engine_data, tmp_path):
    store, source, _, _ = engine_data
    out = tmp_path / "none"
    with pytest.raises(EmptySelectionError, match="select no masks.*round=7..9"):
        export_coco(store, str(out), filters=ExportFilters(rounds=(7, 9)))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_image_is_skipped_and_named(tmp_path):
    root = tmp_path / "data"
    store, source, records = build_store(root)
    victim = sorted({r.image_id for r in records})[0]
    ref = next(r for r in source.list() if r.image_id == victim)
    Path(ref.uri).unlink()
    from storage.images import ImageSource

    summary = export_sa1b(store, str(tmp_path / "out"), ImageSource(str(root / "images")))
    assert [s["image_id"] for s in summary["skipped"]] == [victim]
    assert "not found" in summary["skipped"][0]["reason"]
    assert summary["images"] == len({r.image_id for r in records}) - 1


def test_corrupt_shard_stops_the_export_and_is_named(tmp_path):
    store, source, _ = build_store(tmp_path / "data")
    shard = Path(store.shard_paths()[0])
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(CorruptShardError, match=shard.name):
        export_sa1b(store, str(out), source)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_tar_is_plain_sa1b(engine_data, tmp_path):
    """Meta's layout: flat tar of sa_<n>.<ext> + sa_<n>.json; readers need nothing of ours."""
    store, source, _, _ = engine_data
    out = tmp_path / "plain"
    export_sa1b(store, str(out), source, images_per_tar=100)
    with tarfile.open(out / "sa_000000.tar") as tar:
        names = tar.getnames()
    stems = {n.rsplit(".", 1)[0] for n in names}
    assert all("/" not in n for n in names) and len(names) == 2 * len(stems)
    assert all(s.startswith("sa_") for s in stems)


# ---------------------------------------------------------------------------------------------- S3 and the CLI


def test_s3_export_index_last_and_overwrite_removes_stale_objects(engine_data, s3_bucket):
    store, source, records, _ = engine_data
    out = f"{s3_bucket.uri}/exports/sa1b"
    ep = s3_bucket.endpoint_url
    first = export_sa1b(store, out, source, images_per_tar=1, s3_endpoint_url=ep)
    keys = lambda: sorted(o["Key"] for o in s3_bucket.client.list_objects_v2(  # noqa: E731
        Bucket=s3_bucket.name, Prefix="exports/sa1b/").get("Contents", []))
    assert len([k for k in keys() if k.endswith(".tar")]) == first["images"] > 1
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_sa1b(store, out, source, s3_endpoint_url=ep)
    one = sorted({r.image_id for r in records})[:1]
    export_sa1b(store, out, source, images_per_tar=1, overwrite=True, s3_endpoint_url=ep,
                filters=ExportFilters(image_ids=frozenset(one)))
    assert keys() == sorted(f"exports/sa1b/{k}" for k in
                            (exports.MARKER_NAME, exports.INDEX_NAME, "sa_000000.tar"))
    from storage.datasets import SA1BTarDataset

    got = [s["mask_id"] for s in SA1BTarDataset(out, per="mask", decode=False, s3_endpoint_url=ep)]
    assert sorted(got) == sorted(r.mask_id for r in records if r.image_id == one[0])
    # COCO to S3, read back with pycocotools.
    export_coco(store, f"{s3_bucket.uri}/exports/coco", s3_endpoint_url=ep)
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="exports/coco/instances_all.json")["Body"].read()
    assert len(json.loads(body)["annotations"]) == len(records)


def test_s3_incomplete_export_has_no_index(engine_data, s3_bucket, monkeypatch):
    """A run that dies after deleting the old index leaves no index: readers refuse instead of mixing."""
    store, source, _, _ = engine_data
    out = f"{s3_bucket.uri}/e"
    export_coco(store, out, s3_endpoint_url=s3_bucket.endpoint_url)

    class Boom(RuntimeError):
        pass

    def crash(*a, **k):  # fault injection: the process dies at its first upload, after the old index is gone
        raise Boom("simulated crash mid-export")

    with monkeypatch.context() as m:
        m.setattr(exports._S3Target, "put", crash)
        with pytest.raises(Boom):
            export_coco(store, out, overwrite=True, s3_endpoint_url=s3_bucket.endpoint_url)
    with pytest.raises(exports.CorruptExportError, match="no index.json"):
        read_index(out, s3_bucket.endpoint_url)
    export_coco(store, out, overwrite=True, s3_endpoint_url=s3_bucket.endpoint_url)  # a rerun repairs it
    assert read_index(out, s3_bucket.endpoint_url)["format"] == "coco"


def test_cli_export(engine_data, tmp_path):
    from typer.testing import CliRunner

    from engine.cli import app

    store, source, records, root = engine_data
    ids = tmp_path / "ids.txt"
    wanted = sorted({r.image_id for r in records})[:3]
    ids.write_text("# a subset\n" + "\n".join(wanted) + "\n")
    out = tmp_path / "cli"
    args = ["export", "--format", "sa1b", "--out", str(out), "--store", str(root / "store"), "--images",
            str(root / "images"), "--stage", "auto", "--rounds", "1:2", "--image-ids", str(ids),
            "--split", "train=0.5,val=0.5", "--images-per-tar", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = last_json(result.stdout)
    assert summary["masks"] == sum(1 for r in records if r.stage == "auto" and r.image_id in wanted)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "output exists; pass --overwrite" in " ".join(again.output.split())
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0
    empty = CliRunner().invoke(app, ["export", "--format", "coco", "--out", str(tmp_path / "e"), "--store",
                                     str(root / "store"), "--min-predicted-iou", "1.5"])
    assert empty.exit_code == 1 and "select no masks" in " ".join(empty.output.split()) and not (tmp_path / "e").exists()
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(f"storage:\n  root: {root / 'store'}\nimages:\n  source: {root / 'images'}\n")
    by_config = CliRunner().invoke(app, ["export", "--format", "coco", "--out", str(tmp_path / "c"),
                                         "--config", str(cfg), "--verified-only"])
    assert by_config.exit_code == 0, by_config.output
    assert last_json(by_config.stdout)["masks"] == sum(r.verified for r in records)


def test_unicode_file_names_export_in_both_formats(tmp_path):
    """Accented, CJK and emoji file names go through the store and both exports, each mask at its image's id."""
    from PIL import Image

    from storage.images import ImageSource
    from storage.shards import MaskStore
    from tests.export_fixtures import make_records

    folder = tmp_path / "images"
    folder.mkdir()
    names = ["café.png", "猫の写真.png", "🙂 smile.png", "plain.png"]
    store = MaskStore(str(tmp_path / "store"))
    with store.writer("manual", 1, "v0") as w:
        for k, name in enumerate(names):
            Image.fromarray(np.full((20, 30, 3), 40 * k, np.uint8)).save(folder / name)
            w.add(make_records(name, 20, 30, k + 1, "manual", 1, k, True, "v0"))
            w.image_done(name, k + 1)
        w.commit()
    source = ImageSource(str(folder))
    sa1b = export_sa1b(store, str(tmp_path / "sa1b"), source)
    coco = export_coco(store, str(tmp_path / "coco"))
    assert sa1b["images"] == coco["images"] == 4 and sa1b["masks"] == coco["masks"] == 10
    data = json.loads(next((tmp_path / "coco").rglob("*.json")).read_text())
    by_name = {im["file_name"]: im["id"] for im in data["images"]}
    assert set(by_name) >= set(names)
    per_image = {name: sum(a["image_id"] == by_name[name] for a in data["annotations"]) for name in names}
    assert per_image == {name: k + 1 for k, name in enumerate(names)}
