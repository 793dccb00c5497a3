import json
import threading

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.integrations.synth import make_scene, scene_rng
from storage.backend import StoreError
from storage.records import SCHEMA_VERSION, MaskRecord, make_mask_id
from storage.rle import decode_rles, encode_masks, rle_area, rle_bbox
from storage.shards import CorruptShardError, MaskStore, SchemaVersionError
from tests.output import last_json


def scene_records(index: int, stage: str = "auto", round: int = 0, model_version: str = "m1",
                  size: int = 96) -> tuple[list[MaskRecord], np.ndarray]:
    """Records for the masks of synthetic scene `index` (scores vary with the mask index)."""
    _, masks, _ = make_scene(scene_rng(11, index), size)
    rles = encode_masks(masks)
    areas, boxes = rle_area(rles), rle_bbox(rles)
    image_id = f"img{index:03d}.png"
    records = [MaskRecord(image_id=image_id, mask_id=make_mask_id(image_id, stage, round, k), height=size,
                          width=size, rle=rles[k], area=int(areas[k]), bbox=boxes[k].tolist(), stage=stage,
                          round=round, model_version=model_version, predicted_iou=0.5 + 0.04 * k,
                          stability_score=0.99 - 0.01 * k, point_coords=[[float(k), 2.0]],
                          verified=stage == "manual", annotator="ann-1" if stage == "manual" else None,
                          origin="manual" if stage == "manual" else "auto")
               for k in range(len(rles))]
    return records, masks


def fill(store: MaskStore, images: range, stage="auto", round=0, model_version="m1") -> list[MaskRecord]:
    everything = []
    with store.writer(stage, round, model_version) as w:
        for i in images:
            records, _ = scene_records(i, stage, round, model_version)
            w.add(records)
            w.image_done(records[0].image_id, len(records))
            everything += records
    return everything


def test_write_read_round_trip_and_shard_properties(tmp_path):
    store = MaskStore(str(tmp_path), shard_target_mb=0.01)
    written = fill(store, range(12))
    shards = store.shards()
    assert len(shards) >= 2, "the small target size splits the data into several shards"
    assert sum(s.rows for s in shards) == len(written)
    for s in shards:
        table = pq.read_table(store.url(s))
        ids = table.column("image_id").to_pylist()
        assert ids == sorted(ids) and s.min_image_id == ids[0] and s.max_image_id == ids[-1]
        meta = pq.ParquetFile(store.url(s)).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert (s.stage, s.round, s.model_version, s.schema_version) == ("auto", 0, "m1", SCHEMA_VERSION)
    back = {r.mask_id: r for r in store.iter_records()}
    assert set(back) == {r.mask_id for r in written}
    for r in written[:20]:
        b = back[r.mask_id]
        assert (b.image_id, b.area, b.bbox, b.point_coords, b.origin) == (r.image_id, r.area, r.bbox,
                                                                          r.point_coords, r.origin)
        assert b.rle["counts"] == r.rle["counts"] and abs(b.predicted_iou - r.predicted_iou) < 1e-6
    records, masks = scene_records(3)
    got = sorted(store.iter_records(image_ids=["img003.png"]), key=lambda r: r.mask_id)
    want = sorted(range(len(records)), key=lambda k: records[k].mask_id)
    assert np.array_equal(decode_rles([r.rle for r in got]), masks[want])
    store.verify()


def test_filters(tmp_path):
    store = MaskStore(str(tmp_path), shard_target_mb=0.01)
    auto = fill(store, range(6), "auto", 0, "m1")
    manual = fill(store, range(6, 9), "manual", 1, "m2")
    semi = fill(store, range(9, 11), "semi", 2, "m2")
    total = len(auto) + len(manual) + len(semi)
    assert store.read_table().num_rows == total
    assert store.read_table(stage="manual").num_rows == len(manual)
    assert store.read_table(stage=["manual", "semi"]).num_rows == len(manual) + len(semi)
    assert store.read_table(round=(1, 2)).num_rows == len(manual) + len(semi)
    assert store.read_table(round=0).num_rows == len(auto)
    assert store.read_table(verified=True).num_rows == len(manual)
    assert store.read_table(model_version="m2").num_rows == len(manual) + len(semi)
    assert store.read_table(origin="manual").num_rows == len(manual)
    want = sum(1 for r in auto + manual + semi if np.float32(r.predicted_iou) >= np.float32(0.7))
    assert store.read_table(min_predicted_iou=0.7).num_rows == want
    want = sum(1 for r in auto if np.float32(r.stability_score) >= np.float32(0.96))
    assert store.read_table(stage="auto", min_stability_score=0.96).num_rows == want
    table = store.read_table(columns=["mask_id", "area"], image_ids=["img001.png", "img007.png"])
    assert table.column_names == ["mask_id", "area"]
    assert table.num_rows == sum(1 for r in auto + manual if r.image_id in ("img001.png", "img007.png"))
    assert store.read_table(stage="auto", verified=True).num_rows == 0
    assert store.read_table(image_ids=[]).num_rows == 0
    batches = list(store.iter_batches(stage="auto"))
    assert sum(b.num_rows for b in batches) == len(auto)
    with pytest.raises(TypeError):
        store.read_table(colour="red")


def test_stage_and_round_pruning_skips_other_shards_unopened(tmp_path):
    store = MaskStore(str(tmp_path))
    fill(store, range(2), "auto", 0)
    fill(store, range(2, 4), "manual", 1)
    auto_shard = store.shards()[0]
    (tmp_path / auto_shard.path).write_bytes(b"garbage")  # only readable if opened
    assert store.read_table(stage="manual").num_rows > 0
    with pytest.raises(CorruptShardError, match=auto_shard.path.split("/")[-1]):
        store.read_table(stage="auto")


def test_images_done_per_stage_round_and_model(tmp_path):
    store = MaskStore(str(tmp_path))
    fill(store, range(3), "auto", 0, "m1")
    fill(store, range(3, 5), "auto", 1, "m2")
    assert store.images_done("auto") == {f"img{i:03d}.png" for i in range(5)}
    assert store.images_done("auto", model_version="m2") == {"img003.png", "img004.png"}
    assert store.images_done("auto", round=0) == {f"img{i:03d}.png" for i in range(3)}
    assert store.images_done("manual") == set()
    table = store.images_table("auto")
    assert table.num_rows == 5 and set(table.column("n_masks").to_pylist()) != {0}


def test_exception_discards_uncommitted_and_commit_is_all_or_nothing(tmp_path):
    store = MaskStore(str(tmp_path), shard_target_mb=0.005)
    fill(store, range(2))
    before = store.read_table().num_rows
    with pytest.raises(RuntimeError):
        with store.writer("auto", 0, "m1") as w:
            for i in range(2, 8):
                w.add(scene_records(i)[0])
                w.image_done(f"img{i:03d}.png", 1)
            assert list((tmp_path / "staging").rglob("*.parquet")), "shards were flushed, to staging/"
            assert len(list((tmp_path / "shards").iterdir())) == len(store.shards()), "shards/ holds commits only"
            raise RuntimeError("worker died")
    assert store.read_table().num_rows == before
    assert store.images_done("auto") == {"img000.png", "img001.png"}
    assert len(list((tmp_path / "shards").iterdir())) == len(store.shards())
    assert not list((tmp_path / "staging").rglob("*.parquet")), "uncommitted files removed"


def test_crash_before_manifest_leaves_invisible_files_that_gc_removes(tmp_path):
    store = MaskStore(str(tmp_path), shard_target_mb=0.005)
    fill(store, range(1))
    before = store.read_table().num_rows
    w = store.writer("auto", 0, "m1")
    for i in range(1, 6):
        w.add(scene_records(i)[0])
    # the process is killed here: shard files exist (in staging/), the manifest never mentions them
    orphans = list((tmp_path / "staging").rglob("*.parquet"))
    assert orphans and len(list((tmp_path / "shards").iterdir())) == len(store.shards())
    assert store.read_table().num_rows == before
    assert store.collect_garbage(min_age_s=3600) == []  # too young: may belong to a live writer
    deleted = store.collect_garbage(min_age_s=0)
    assert sorted(deleted) == sorted(p.relative_to(tmp_path).as_posix() for p in orphans)
    store.verify()


def test_a_glob_over_shards_reads_exactly_the_committed_data_set(tmp_path):
    """DuckDB's plain glob, as a user runs it, after a writer killed before its commit, a worker's part nobody
    adopted, and a commit cut off between its manifest swap and its files' move (the next read finishes it)."""
    import duckdb

    store = MaskStore(str(tmp_path), shard_target_mb=0.005)
    fill(store, range(3))
    killed = store.writer("auto", 0, "m1")
    for i in range(3, 6):
        killed.add(scene_records(i)[0])
    killed._flush()  # written, never committed: the process dies here
    store.write_part(scene_records(6)[0], "auto", 0, "m1")  # a worker's part no commit adopted

    def globbed() -> int:
        return duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/shards/*.parquet')").fetchall()[0][0]

    assert globbed() == store.read_table().num_rows == sum(s.rows for s in store.shards())
    # A commit whose manifest swap happened but whose files were not moved yet (killed in between)
    w = store.writer("auto", 0, "m1")
    w.add(scene_records(7)[0])
    w.image_done("img007.png", len(scene_records(7)[0]))
    publish, store._publish = store._publish, lambda infos: None
    w.commit()
    store._publish = publish
    committed = sum(s.rows for s in store.shards())
    assert globbed() < committed  # the glob misses it for now, it never sees more than the manifest
    assert store.read_table().num_rows == committed  # a read moves it into place
    assert globbed() == committed
    store.verify()
    store.collect_garbage(min_age_s=0)
    assert globbed() == committed and not list((tmp_path / "staging").rglob("*.parquet"))


def test_workers_parts_are_committed_by_the_driver_and_recovered_by_rebuild(tmp_path):
    """A worker writes its shard (write_part) and hands back the descriptor only; the driver's commit adopts it.
    rebuild_manifest keeps adopted parts, leaves out a part nobody adopted, and finishes a cut-off move."""
    store = MaskStore(str(tmp_path))
    parts = [store.write_part(scene_records(i)[0], "auto", 0, "m1") for i in range(3)]
    assert store.shards() == [] and not list((tmp_path / "shards").glob("*.parquet"))
    with store.writer("auto", 0, "m1") as w:
        for i, part in enumerate(parts[:2]):
            w.adopt(part)
            w.image_done(f"img{i:03d}.png", part.rows)
    assert store.images_done("auto") == {"img000.png", "img001.png"}
    assert store.read_table().num_rows == parts[0].rows + parts[1].rows
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.parquet")) == sorted(
        p.path.split("/")[-1] for p in parts[:2])
    with pytest.raises(ValueError, match="differs from the writer"):
        store.writer("auto", 1, "m1").adopt(parts[2])
    # The manifest is lost after a commit whose move was cut off
    late = store.write_part(scene_records(4)[0], "auto", 0, "m1")
    publish, store._publish = store._publish, lambda infos: None
    with store.writer("auto", 0, "m1") as w:
        w.adopt(late)
        w.image_done("img004.png", late.rows)
    store._publish = publish
    want = store.read_table(columns=["mask_id"]).column("mask_id").to_pylist()
    (tmp_path / "manifest.json").unlink()
    out = store.rebuild_manifest()
    assert sorted(store.read_table(columns=["mask_id"]).column("mask_id").to_pylist()) == sorted(want)
    assert [x["reason"] for x in out["left_out"]] == ["its commit never finished (a writer stopped before its commit)"]
    assert parts[2].path.split("/")[-1] in out["left_out"][0]["path"]
    assert (tmp_path / late.path).is_file()  # moved into place
    store.verify()


def test_several_commits_from_one_writer_and_manifest_generations(tmp_path):
    store = MaskStore(str(tmp_path))
    with store.writer("auto", 0, "m1") as w:
        w.add(scene_records(0)[0])
        first = w.commit()
        assert len(store.shards()) == 1 and first[0].rows == len(scene_records(0)[0])
        w.add(scene_records(1)[0])
        w.commit()
        assert w.commit() == []  # nothing pending: an empty commit changes no data
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["generation"] == 3
    assert len(manifest["shards"]) == 2 and manifest["last_commit"]["kind"] == "append"


def test_concurrent_writers_lose_no_commit(tmp_path):
    errors = []

    def worker(offset: int) -> None:
        try:
            own = MaskStore(str(tmp_path))
            for i in range(offset, offset + 4):
                with own.writer("auto", 0, "m1") as w:
                    w.add(scene_records(i, size=48)[0])
                    w.image_done(f"img{i:03d}.png", 1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k * 10,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = MaskStore(str(tmp_path))
    assert len(store.shards()) == 12 and len(store.images_done("auto")) == 12
    store.verify()


def test_upsert_latest_wins_rewrites_shards_and_keeps_history(tmp_path):
    store = MaskStore(str(tmp_path))
    original = fill(store, range(4), "auto", 0, "m1")
    target = [r for r in original if r.image_id == "img002.png"][:2]
    edited = [MaskRecord(**{**r.__dict__, "stage": "manual", "round": 1, "model_version": "m2",
                            "verified": True, "annotator": "ann-7", "origin": "prefill_edited"})
              for r in target]
    infos = store.upsert(edited, "manual", 1, "m2")
    assert any(i.stage == "manual" for i in infos)
    table = store.read_table()
    assert table.num_rows == len(original), "replaced, not added"
    assert len(set(table.column("mask_id").to_pylist())) == len(original)
    rows = {r.mask_id: r for r in store.iter_records(image_ids=["img002.png"])}
    for r in edited:
        now = rows[r.mask_id]
        assert now.stage == "manual" and now.annotator == "ann-7" and now.verified
        assert len(now.history) == 1 and now.history[0]["stage"] == "auto"
        assert now.history[0]["model_version"] == "m1" and now.history[0]["version"].startswith("shards/")
    # second upsert of the same mask keeps the whole chain
    again = [MaskRecord(**{**edited[0].__dict__, "annotator": "ann-8", "history": None})]
    store.upsert(again, "manual", 1, "m2")
    latest = next(store.iter_records(image_ids=["img002.png"], origin="prefill_edited", verified=True,
                                     model_version="m2"))
    chain = {r.mask_id: r for r in store.iter_records(image_ids=["img002.png"])}[edited[0].mask_id]
    assert chain.annotator == "ann-8" and [h["stage"] for h in chain.history] == ["auto", "manual"]
    assert latest is not None
    # replaced shard files are gone, the rest verifies
    listed = {s.path for s in store.shards()} | {s.path for s in store.manifest().image_indexes}
    on_disk = {f"{p.parent.name}/{p.name}" for d in ("shards", "images") for p in (tmp_path / d).iterdir()}
    assert on_disk == listed
    store.verify()
    # a lost manifest is rebuilt with every commit an upsert rewrote counted as finished (its index kept)
    want = sorted((r.mask_id, r.annotator) for r in store.iter_records())
    done = store.images_done("auto")
    (tmp_path / "manifest.json").unlink()
    assert not store.rebuild_manifest()["left_out"]
    assert sorted((r.mask_id, r.annotator) for r in store.iter_records()) == want
    assert store.images_done("auto") == done


def test_upsert_of_new_masks_adds_them(tmp_path):
    store = MaskStore(str(tmp_path))
    records, _ = scene_records(0, "manual", 0)
    store.upsert(records, "manual", 0, "m0")
    assert store.read_table().num_rows == len(records)
    assert all(r.history is None for r in store.iter_records())


def test_writer_refuses_records_of_another_stage(tmp_path):
    store = MaskStore(str(tmp_path))
    with pytest.raises(ValueError, match="differs from the writer's auto/0"):
        with store.writer("auto", 0, "m1") as w:
            w.add(scene_records(0, "manual", 0)[0])
    with pytest.raises(ValueError, match="not one of"):
        store.writer("robot", 0, None)
    assert store.shards() == []


def test_checksum_mismatch_names_the_shard(tmp_path):
    store = MaskStore(str(tmp_path))
    fill(store, range(2))
    shard = store.shards()[0]
    path = tmp_path / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError) as e:
        store.verify()
    assert str(e.value).startswith(str(path)) and "sha256" in str(e.value) and "\n" not in str(e.value)


def test_truncated_or_missing_shard_is_refused_on_read(tmp_path):
    store = MaskStore(str(tmp_path))
    fill(store, range(2))
    shard = store.shards()[0]
    path = tmp_path / shard.path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptShardError, match="truncated or replaced"):
        store.read_table()
    path.unlink()
    with pytest.raises(CorruptShardError, match="listed in the manifest but missing"):
        store.read_table()
    with pytest.raises(CorruptShardError, match="missing"):
        store.verify()


def test_shard_from_a_newer_schema_version_is_refused(tmp_path):
    store = MaskStore(str(tmp_path))
    fill(store, range(1))
    shard = store.shards()[0]
    path = tmp_path / shard.path
    table = pq.read_table(path)
    newer = table.replace_schema_metadata({b"sa_engine_schema_version": str(SCHEMA_VERSION + 1).encode()})
    pq.write_table(newer, path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    import hashlib

    manifest["shards"][0]["bytes"] = path.stat().st_size
    manifest["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        store.read_table()
    manifest["shards"][0]["schema_version"] = SCHEMA_VERSION + 1  # the manifest says so too
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match=str(path)):
        store.read_table()


def test_newer_or_broken_manifest_is_refused(tmp_path):
    store = MaskStore(str(tmp_path))
    fill(store, range(1))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["manifest_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="manifest version 99"):
        store.shards()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptShardError, match="manifest.json: manifest is not valid JSON"):
        store.shards()


def test_unwritable_output_is_a_clear_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where the store folder should be")
    store = MaskStore(str(tmp_path / "blocker" / "store"))
    with pytest.raises(StoreError) as e:
        with store.writer("auto", 0, "m1") as w:
            w.add(scene_records(0)[0])
    assert "cannot write" in str(e.value) and "\n" not in str(e.value)


def test_duckdb_pandas_and_pyarrow_read_the_shards_directly(tmp_path):
    store = MaskStore(str(tmp_path), shard_target_mb=0.01)
    fill(store, range(5), "auto", 0)
    fill(store, range(5, 7), "manual", 1)
    paths = store.shard_paths()
    rows = duckdb.sql(
        f"SELECT stage, count(*) AS n, sum(area) AS pixels FROM read_parquet({paths!r}) "
        "WHERE predicted_iou >= 0.6 GROUP BY stage ORDER BY stage").fetchall()
    table = store.read_table(min_predicted_iou=0.6)
    for stage, n, pixels in rows:
        part = table.filter(pa.compute.equal(table.column("stage"), stage))
        assert n == part.num_rows and pixels == pa.compute.sum(part.column("area")).as_py()
    frame = pd.concat(pd.read_parquet(p) for p in paths)
    assert len(frame) == store.read_table().num_rows and frame["rle"].map(type).eq(bytes).all()
    assert pq.ParquetDataset(paths).read().num_rows == len(frame)


def test_compact_merges_small_shards_and_keeps_every_row(tmp_path):
    """`sa-engine store compact`: many small commits become a few shards per (stage, round, model); rows, ids and
    lineage unchanged; the glob, verify and a rebuilt manifest agree."""
    import duckdb

    store = MaskStore(str(tmp_path), shard_target_mb=0.2)
    for i in range(8):
        fill(store, [i], "auto", 0, "m1")
    fill(store, [8, 9], "manual", 1, None)
    before = sorted(store.read_table().to_pylist(), key=lambda r: r["mask_id"])
    n_before = len(store.shards())
    assert store.compact(dry_run=True)["written"] is False and len(store.shards()) == n_before
    out = store.compact()
    assert out["shards_after"] < n_before and out["rows"] > 0
    assert sorted(store.read_table().to_pylist(), key=lambda r: r["mask_id"]) == before
    assert store.images_done("auto") == {f"img{i:03d}.png" for i in range(8)}
    assert {(s.stage, s.round) for s in store.shards()} == {("auto", 0), ("manual", 1)}
    glob = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/shards/*.parquet')").fetchall()[0][0]
    assert glob == len(before) == len(list(store.iter_records()))
    store.verify()
    (tmp_path / "manifest.json").unlink()
    rebuilt = store.rebuild_manifest()
    assert rebuilt["rows"] == len(before) and not rebuilt["left_out"]


def test_store_compact_command(tmp_path):
    from typer.testing import CliRunner

    from engine.cli import app

    store = MaskStore(str(tmp_path))
    for i in range(3):
        fill(store, [i], "auto", 0, "m1")
    rows = store.read_table().num_rows
    dry = CliRunner().invoke(app, ["store", "compact", "--store", str(tmp_path), "--dry-run"])
    assert dry.exit_code == 0 and last_json(dry.stdout)["shards_after"] == 1
    assert len(store.shards()) == 3
    out = CliRunner().invoke(app, ["store", "compact", "--store", str(tmp_path)])
    assert out.exit_code == 0 and "3 shards -> 1" in out.output
    assert len(store.shards()) == 1 and store.read_table().num_rows == rows
