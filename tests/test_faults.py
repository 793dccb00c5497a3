"""The fault suite (issue 17): bad inputs and faults a careless user, a flaky disk or a killed process bring.

Each case ends in a clear one-line error or a correct result, and nothing committed is lost. docs/faults.md
lists every case of this file and of the older ones it builds on, with its outcome. Real parts only: real
files, FIFOs, shards, checkpoints and the CLI.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from storage.backend import LocalStore
from storage.exports import ExportFilters, export_coco, export_sa1b
from storage.images import BadImage, ImageSource, decode_image, match_file_names
from storage.quarantine import Quarantine
from storage.shards import CorruptShardError, MaskStore
from tests.export_fixtures import build_store
from tests.output import last_json

runner = CliRunner()


def png(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def one_line(text: str) -> str:
    """The error line of a CLI run (stderr is mixed into output by CliRunner)."""
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------------------------------------- images

def test_fifo_named_png_is_set_aside_without_blocking(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")  # opening it for reading would block forever
    src = ImageSource(str(tmp_path))
    q = Quarantine(str(tmp_path / "store"))
    start = time.perf_counter()
    loaded = list(src.load_many(src.list(), q, stage="auto"))
    assert time.perf_counter() - start < 5 and [im.image_id for im in loaded] == ["a.png"]
    [entry] = q.entries()
    assert entry["reason"] == "not a regular file (a FIFO, socket or device)" and entry["kind"] == "permanent"


class SlowStore(LocalStore):
    """A local folder whose reads hang (a stalled NFS mount, a slow S3 read)."""

    def read_bytes(self, key: str) -> bytes:
        time.sleep(3)
        return super().read_bytes(key)


def test_a_read_that_hangs_is_given_up_after_the_time_limit(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    src = ImageSource(str(tmp_path), store=SlowStore(tmp_path), load_timeout_s=0.3)
    start = time.perf_counter()
    with pytest.raises(BadImage, match=r"a.png: not read within 0.3 s \(images.load_timeout_s\)") as e:
        src.load(src.ref("a.png"))
    assert e.value.transient and time.perf_counter() - start < 2


def test_pixel_limit_is_ours_not_pils(tmp_path):
    # 9500 x 9500 = 90.25 Mpx: above PIL's own 89.5 Mpx warning limit, below our documented 120 Mpx
    big = io.BytesIO()
    Image.new("L", (9500, 9500)).save(big, "PNG")
    assert decode_image(big.getvalue(), "big.png").shape == (9500, 9500, 3)
    with pytest.raises(BadImage, match=r"9500x9500 pixels exceeds the 90000000 pixel limit"):
        decode_image(big.getvalue(), "big.png", max_pixels=90_000_000)
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 Mpx in a few kB
    with pytest.raises(BadImage, match="decompression bomb") as e:
        decode_image(bomb.getvalue(), "bomb.png")
    assert not e.value.transient


def test_a_thin_image_is_downscaled_not_refused(tmp_path):
    Image.fromarray(np.full((3, 20000, 3), 90, np.uint8)).save(tmp_path / "thin.png")
    loaded = ImageSource(str(tmp_path), max_side=1500).load(ImageSource(str(tmp_path)).ref("thin.png"))
    assert loaded.pixels.shape == (1, 1500, 3) and loaded.original_size == (3, 20000)


def test_cmyk_and_a_folder_named_like_an_image(tmp_path):
    cmyk = Image.fromarray(np.full((6, 7, 3), 200, np.uint8)).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg")
    (tmp_path / "folder.png").mkdir()
    src = ImageSource(str(tmp_path))
    assert [r.image_id for r in src.list()] == ["c.jpg"]
    assert src.load(src.ref("c.jpg")).pixels.shape == (6, 7, 3)


@pytest.mark.parametrize("data,kind", [
    (b"", "transient"),  # a copy in progress
    (png(np.zeros((64, 64, 3), np.uint8), "JPEG")[:200], "transient"),  # half-written
    (b"GIF89a but not really", "permanent"),
    (b"%PDF-1.7 a document", "permanent"),
])
def test_bad_files_are_classed_transient_or_permanent(data, kind):
    with pytest.raises(BadImage) as e:
        decode_image(data, "x.jpg")
    assert e.value.kind == kind and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- quarantine

def test_transient_entries_are_retried_then_held_and_release_lets_them_through(tmp_path):
    q = Quarantine(str(tmp_path), retries=2)
    q.add("/img/missing.png", "not found", "auto", "transient")
    q.add("/img/text.png", "not an image", "auto", "permanent")
    assert q.things("auto") == {"/img/text.png"} and q.retrying("auto") == {"/img/missing.png"}
    q.add("/img/missing.png", "not found", "auto", "transient")
    assert q.retrying("auto") == {"/img/missing.png"}  # 2 attempts: still retried
    q.add("/img/missing.png", "not found", "auto", "transient")
    assert q.things("auto") == {"/img/text.png", "/img/missing.png"}  # past the retries: held
    released = Quarantine(str(tmp_path)).release(["/img/missing.png"])
    assert [e["thing"] for e in released] == ["/img/missing.png"]
    assert q.things("auto") == {"/img/text.png"} and q.retrying("auto") == set()
    Quarantine(str(tmp_path)).release(None, stage="auto")
    assert q.entries() == []


def write_config(tmp_path: Path, **images) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    data = {"workdir": str(tmp_path / "work"), "images": {"source": str(tmp_path / "images"), **images},
            "storage": {"root": str(tmp_path / "store")}}
    p = tmp_path / "engine.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_quarantine_cli_lists_and_releases(tmp_path):
    cfg = write_config(tmp_path)
    q = Quarantine(str(tmp_path / "store"))
    q.add(str(tmp_path / "images" / "gone.png"), "not found", "auto", "transient")
    q.add(str(tmp_path / "images" / "text.png"), "not an image", "auto", "permanent")
    out = runner.invoke(app, ["quarantine", "list", "--config", str(cfg)])
    assert out.exit_code == 0 and "2 set aside (1 held)" in out.output
    rows = last_json(out.output)
    assert {(Path(r["thing"]).name, r["held"]) for r in rows} == {("gone.png", False), ("text.png", True)}
    out = runner.invoke(app, ["quarantine", "release", "--config", str(cfg), str(tmp_path / "images" / "text.png")])
    assert out.exit_code == 0 and "released 1" in out.output
    out = runner.invoke(app, ["quarantine", "release", "--config", str(cfg), "never-seen.png"])
    assert out.exit_code == 1 and "not set aside: never-seen.png" in out.output
    assert runner.invoke(app, ["quarantine", "release", "--config", str(cfg)]).exit_code == 2


# ------------------------------------------------------------------------------------------- config

def test_stage_auto_checks_the_config_first(tmp_path):
    cfg = write_config(tmp_path, source="/nonexistent/photos")
    out = runner.invoke(app, ["stage", "auto", "--config", str(cfg)])
    assert out.exit_code == 2
    assert one_line(out.output) == "error: images.source: /nonexistent/photos: not found"


def test_stage_auto_with_an_unreachable_s3_store_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    cfg = write_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["storage"] = {"root": "s3://no-such-bucket/store", "s3_endpoint_url": "http://127.0.0.1:9"}
    cfg.write_text(yaml.safe_dump(data))
    out = runner.invoke(app, ["stage", "auto", "--config", str(cfg)])
    assert out.exit_code == 2 and one_line(out.output).startswith("error: storage.root: s3://no-such-bucket/store: ")


def test_stage_manual_refuses_before_starting_label_studio(tmp_path):
    cfg = write_config(tmp_path, ground_truth=None)
    out = runner.invoke(app, ["stage", "manual", "--config", str(cfg), "--simulate"])
    assert out.exit_code == 2
    assert "images.ground_truth: required when stages.simulate is true" in out.output
    assert not (tmp_path / "work" / "labelstudio").exists()  # no server, no half-made project


def test_unwritable_storage_root(tmp_path):
    from engine.integrations.config import check_config, load_config

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        cfg = load_config(write_config(tmp_path), {"storage.root": str(ro / "store")})
        assert f"storage.root: {ro / 'store'}: not writable ({ro} is read-only)" in check_config(cfg, network=False)
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------------------------ ground truth

def test_ground_truth_file_names_with_folders_match_by_a_documented_rule():
    ids = ["x.jpg", "y.jpg", "train/z.jpg", "a/dup.jpg", "b/dup.jpg"]
    names = ["JPEGImages/x.jpg", "y.jpg", "z.jpg", "dup.jpg", "elsewhere/nothing.jpg"]
    assert match_file_names(names, ids) == {"JPEGImages/x.jpg": "x.jpg", "y.jpg": "y.jpg", "z.jpg": "train/z.jpg"}


def test_ground_truth_that_matches_no_image_stops_with_both_sides(tmp_path):
    from engine.integrations import runtime
    from engine.integrations.config import load_config
    from engine.integrations.labelstudio import LabelStudioError

    cfg_path = write_config(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "photo1.jpg")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "other/frame_0001.png", "height": 8, "width": 8}],
                              "annotations": []}))
    cfg = load_config(cfg_path, {"images.ground_truth": str(gt)})
    with pytest.raises(LabelStudioError) as e:
        runtime.ground_truth(cfg)
    assert "\n" not in str(e.value) and "'other/frame_0001.png'" in str(e.value) and "'photo1.jpg'" in str(e.value)
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "JPEGImages/photo1.jpg", "height": 8, "width": 8}],
                              "annotations": []}))
    assert runtime.ground_truth(cfg) == {"photo1.jpg": []}


# ------------------------------------------------------------------------------------ store integrity

def damage(store: MaskStore, how: str) -> str:
    """Rewrite one committed mask row of `store` the way `how` says, keeping the manifest's checksums true
    (damage below the checksum: a buggy writer, not a flipped bit). Returns the damaged mask id."""
    import hashlib

    import pyarrow as pa

    info = store.shards()[0]
    path = Path(store.url(info))
    table = pq.read_table(path)
    rows = table.to_pylist()
    row = rows[0]
    if how == "garbage":
        row["rle"] = b"\xff\xfe\x00garbage"
    elif how == "truncated":
        row["rle"] = row["rle"][: len(row["rle"]) // 2]
    elif how == "doubled_height":
        row["height"] *= 2
    elif how == "doubled_all":  # every mask of the image agrees on the wrong size
        for r in rows:
            if r["image_id"] == row["image_id"]:
                r["height"] *= 2
    new = pa.Table.from_pylist(rows, schema=table.schema)
    sink = pa.BufferOutputStream()
    pq.write_table(new, sink)
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    manifest = store.manifest()
    for s in manifest.shards:
        if s.path == info.path:
            s.sha256, s.bytes = hashlib.sha256(data).hexdigest(), len(data)
    store.store.write_bytes("manifest.json", manifest.to_bytes())
    return row["mask_id"]


@pytest.mark.parametrize("how", ["garbage", "truncated", "doubled_height", "doubled_all"])
def test_damaged_rows_are_found_by_verify_deep_and_left_out_of_exports(tmp_path, how):
    store, source, records = build_store(tmp_path)
    mask_id = damage(store, how)
    store.verify()  # the checksums agree: only the deep check can see it
    problems = store.verify_deep(lambda i: source.load(source.ref(i)).original_size)
    assert f"mask {mask_id}: " in problems[0] and store.shards()[0].path in problems[0]
    assert len(problems) == (1 if how != "doubled_all" else sum(
        r.image_id == records[0].image_id and r.stage == "manual" for r in records))
    # only the damaged shard's stage: with the other stages' (sound) masks, a wrong size shows as disagreement
    only = ExportFilters(stage=(store.shards()[0].stage,)) if how == "doubled_all" else ExportFilters()
    coco = export_coco(store, str(tmp_path / "coco"), filters=only)
    image_id = next(r.image_id for r in records if r.mask_id == mask_id)
    if how == "doubled_height":  # the image's masks disagree on its size: the whole image is set aside, named
        assert coco["skipped_masks"] == [] and [s["image_id"] for s in coco["skipped"]] == [image_id]
        assert "disagree on the image size" in coco["skipped"][0]["reason"]
    elif how == "doubled_all":  # they agree on a wrong size: every row is damaged, the image is left out
        assert mask_id in {m["mask_id"] for m in coco["skipped_masks"]}
        assert image_id in {s["image_id"] for s in coco["skipped"]}
    else:
        [skipped] = coco["skipped_masks"]
        assert skipped["mask_id"] == mask_id and skipped["shard"].endswith(store.shards()[0].path)
    doc = json.loads((tmp_path / "coco" / "instances_all.json").read_text())
    assert mask_id not in {a["sa_engine"]["mask_id"] for a in doc["annotations"]}
    sizes = {im["file_name"]: (im["height"], im["width"]) for im in doc["images"]}
    assert all(sizes[i] == source.load(source.ref(i)).original_size for i in sizes)  # no doubled height
    sa1b = export_sa1b(store, str(tmp_path / "sa1b"), source, filters=only)
    assert sa1b["masks"] + len(sa1b["skipped_masks"]) + sum(
        1 for s in sa1b["skipped"]) >= coco["masks"]  # every mask either exported or named


def test_verify_deep_cli_exits_1_naming_the_row(tmp_path):
    store, _, _ = build_store(tmp_path)
    mask_id = damage(store, "garbage")
    out = runner.invoke(app, ["store", "verify", "--store", str(tmp_path / "store"), "--deep"])
    assert out.exit_code == 1 and f"mask {mask_id}: byte 0 of the counts" in out.output
    assert runner.invoke(app, ["store", "verify", "--store", str(tmp_path / "store")]).exit_code == 0


def test_lost_and_truncated_manifests_are_rebuilt_from_the_shards(tmp_path):
    store, _, records = build_store(tmp_path)
    before = sorted(r.mask_id for r in store.iter_records())
    done = store.images_done("auto", "m1")
    manifest = tmp_path / "store" / "manifest.json"
    old = time.time() - 120
    for p in (tmp_path / "store").rglob("*.parquet"):
        os.utime(p, (old, old))
    manifest.write_bytes(manifest.read_bytes()[:100])  # truncated
    with pytest.raises(CorruptShardError, match="rebuild-manifest"):
        store.shards()
    out = runner.invoke(app, ["store", "rebuild-manifest", "--store", str(tmp_path / "store")])
    assert out.exit_code == 0, out.output
    assert sorted(r.mask_id for r in store.iter_records()) == before and store.images_done("auto", "m1") == done
    assert list((tmp_path / "store").glob("manifest.json.damaged-*"))  # the damaged one is kept
    manifest.unlink()  # lost
    with pytest.raises(CorruptShardError, match="missing, but the store holds shard files"):
        store.shards()
    store.rebuild_manifest()
    assert sorted(r.mask_id for r in store.iter_records()) == before
    store.verify()


def test_rebuild_leaves_out_unfinished_commits_and_replaced_shards(tmp_path):
    store, _, _ = build_store(tmp_path)
    before = sorted(r.mask_id for r in store.iter_records())
    # a writer that died before its commit: its shard is on disk, its closing index is not
    writer = store.writer("auto", 3, "m3")
    rec = next(store.iter_records(stage="auto", round=1))
    from dataclasses import replace

    writer.add([replace(rec, mask_id="orphan-1", round=3, model_version="m3")])
    writer._flush()
    # an upsert that replaced a shard whose delete never happened
    manual = next(store.iter_records(stage="manual"))
    replaced_path = next(s.path for s in store.shards() if s.stage == "manual" and s.min_image_id <= manual.image_id)
    old_copy = (tmp_path / "store" / replaced_path).read_bytes()
    store.upsert([replace(manual, annotator="ann-2")], stage="manual", round=0, model_version=manual.model_version)
    (tmp_path / "store" / replaced_path).write_bytes(old_copy)
    after = sorted(r.mask_id for r in store.iter_records())
    assert after == before
    (tmp_path / "store" / "manifest.json").unlink()
    summary = store.rebuild_manifest()
    reasons = {Path(x["path"]).name: x["reason"] for x in summary["left_out"]}
    assert any("never finished" in r for r in reasons.values()) and Path(replaced_path).name in reasons
    back = list(store.iter_records())
    assert sorted(r.mask_id for r in back) == before  # no orphan, no duplicate
    assert next(r for r in back if r.mask_id == manual.mask_id).annotator == "ann-2"  # the upsert's version


def test_gc_removes_orphans_and_killed_export_staging(tmp_path):
    store, _, _ = build_store(tmp_path)
    cfg = write_config(tmp_path)
    orphan = tmp_path / "store" / "shards" / "deadbeef.parquet"
    orphan.write_bytes(b"x")
    half = tmp_path / "store" / "shards" / ".abc.parquet.1234.tmp"
    half.write_bytes(b"x")
    staging = tmp_path / ".out.tmp-12345678"
    (staging / ".scratch").mkdir(parents=True)
    old = time.time() - 7200
    for p in (orphan, half, staging):
        os.utime(p, (old, old))
    out = runner.invoke(app, ["gc", "--config", str(cfg), "--export", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    assert not orphan.exists() and not half.exists() and not staging.exists()
    assert len(list(store.iter_records())) > 0  # committed data untouched


# --------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_saves_are_atomic_and_weights_are_checked(tmp_path):
    from model.checkpoints import CheckpointError, collect_checkpoint_garbage, load_checkpoint, save_checkpoint
    from model.segmenter import Segmenter

    a, b = Segmenter.new("compact", seed=0), Segmenter.new("compact", seed=1)
    ckpt = tmp_path / "models" / "r1"
    va = save_checkpoint(a.net, a.arch, ckpt, {})
    vb = save_checkpoint(b.net, b.arch, tmp_path / "models" / "other", {})
    assert load_checkpoint(ckpt)[2] == va
    # a crash between the weights and the JSON, as the old save could leave it: new weights, old version
    (ckpt / "model.safetensors").write_bytes((tmp_path / "models" / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(ckpt)
    assert save_checkpoint(b.net, b.arch, ckpt, {}) == vb and load_checkpoint(ckpt)[2] == vb  # re-save: one unit
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == []
    # a save killed between its two renames: the old copy is aside, the checkpoint missing
    os.replace(ckpt, tmp_path / "models" / ".r1.old-abcd1234")
    with pytest.raises(CheckpointError, match="a save was interrupted"):
        load_checkpoint(ckpt)
    old = time.time() - 7200
    os.utime(tmp_path / "models" / ".r1.old-abcd1234", (old, old))
    assert collect_checkpoint_garbage(tmp_path / "models")
    assert load_checkpoint(ckpt)[2] == vb


# ----------------------------------------------------------------------------------------- file modes

def test_secrets_are_readable_by_the_owner_only(tmp_path):
    from engine.integrations import runtime
    from engine.integrations.config import load_config
    from engine.integrations.labelstudio import ServerSettings, _credentials, private_dir

    cfg = load_config(write_config(tmp_path))
    runtime.ml_backend_token(cfg)
    token_file = Path(cfg.path("labelstudio")) / "ml_backend_token"
    assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.parent.stat().st_mode & 0o777 == 0o700
    data_dir = private_dir(tmp_path / "ls-data")
    _credentials(ServerSettings(data_dir=str(data_dir), port=1, username="u"))
    assert (data_dir / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert data_dir.stat().st_mode & 0o777 == 0o700


# ------------------------------------------------------------------------------------------ endings

def test_endings_that_did_not_deliver_have_their_own_exit_status():
    from engine.cli import EXIT_MISSED_TARGET, EXIT_NO_MASKS, EXIT_OK, ending_problems

    assert ending_problems([{"stage": "auto", "round": 4, "images": 8, "masks": 31}]) == (EXIT_OK, [])
    code, lines = ending_problems([{"stage": "auto", "round": 4, "images": 8, "masks": 0,
                                    "thresholds": {"pred_iou_thresh": 0.88}}])
    assert code == EXIT_NO_MASKS and lines == ["auto round 4: 8 image(s) processed, 0 masks written "
                                               "(filters: {'pred_iou_thresh': 0.88})"]
    # a fresh preset's 0 masks: the line says why and what to do
    _, lines = ending_problems([{"stage": "auto", "round": 1, "images": 8, "masks": 0,
                                 "model_version": "compact-init-4b30380751dd"}])
    assert "the model is fresh and untrained (model.checkpoint is unset)" in lines[0]
    _, lines = ending_problems([{"stage": "manual", "round": 1, "images": 8, "masks": 0, "simulated": None}])
    assert lines[0].endswith("nobody submitted an annotation: annotate the project's tasks, then rerun to pull them")
    code, lines = ending_problems([{"stage": "semi", "round": 3, "images": 6, "masks": 40,
                                    "prefill_precision": 0.0, "target_precision": 0.9}])
    assert code == EXIT_MISSED_TARGET and lines[0].startswith("semi round 3: prefill precision 0.000 missed its "
                                                              "target 0.900")
    assert ending_problems([{"stage": "semi", "round": 3, "images": 6, "masks": 40, "prefill_precision": None,
                             "target_precision": 0.9}])[0] == EXIT_OK  # nothing measured: nothing claimed


@pytest.mark.ray
def test_stage_auto_on_an_empty_folder_says_so_and_exits_3(ray_cluster, tmp_path):
    cfg = write_config(tmp_path)
    out = runner.invoke(app, ["stage", "auto", "--config", str(cfg)])
    assert out.exit_code == 3 and "no images under images.source: nothing done" in out.output
