"""Training input: IterableDatasets over the shard store and SA-1B tars give every mask exactly once,
across DataLoader workers and ranks, with masks and images identical to what was stored."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from storage.datasets import MaskShardDataset, SA1BTarDataset, shares_for
from storage.exports import CorruptExportError, export_sa1b, read_index
from storage.images import decode_image
from tests.export_fixtures import build_store


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsdata")
    store, source, records = build_store(root)
    export_sa1b(store, str(root / "sa1b"), source, images_per_tar=2)
    return store, source, records, root


def _store_rows(store) -> dict[str, dict]:
    return {r["mask_id"]: r for r in store.read_table().to_pylist()}


def _read(ds, workers: int) -> list[dict]:
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


@pytest.mark.parametrize("readers", range(1, 8))
@pytest.mark.parametrize("units", [0, 1, 2, 3, 5, 9])
def test_shares_cover_every_item_once(readers, units):
    items_per_unit = 7
    seen = Counter()
    for r in range(readers):
        for share in shares_for(r, readers, units):
            seen.update((share.unit, i) for i in range(items_per_unit) if share.takes(i))
    assert seen == Counter({(u, i): 1 for u in range(units) for i in range(items_per_unit)})


def test_shards_two_workers_each_mask_once(data):
    store, _, records, _ = data
    rows = _store_rows(store)
    samples = _read(MaskShardDataset(store), workers=2)
    assert Counter(s["mask_id"] for s in samples) == Counter({m: 1 for m in rows})
    for s in samples:  # lazily decoded masks are the stored masks, bit for bit
        row = rows[s["mask_id"]]
        expected = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["rle"]}).astype(bool)
        assert s["mask"].dtype == torch.bool and np.array_equal(s["mask"].numpy(), expected)
        assert s["bbox"].tolist() == pytest.approx(row["bbox"])


@pytest.mark.parametrize("world_size", [2, 5])
def test_shards_simulated_ranks_with_workers_each_mask_once(data, world_size):
    """2 ranks x 2 workers = 4 readers over 3 shards (readers share shards); 5 ranks x 2 = 10 readers."""
    store, _, _, _ = data
    rows = _store_rows(store)
    assert len(store.shards()) < 2 * world_size
    seen = Counter()
    per_rank = []
    for rank in range(world_size):
        got = [s["mask_id"] for s in _read(MaskShardDataset(store, decode=False, rank=rank, world_size=world_size),
                                          workers=2)]
        per_rank.append(len(got))
        seen.update(got)
    assert seen == Counter({m: 1 for m in rows})
    assert sum(1 for n in per_rank if n > 0) >= 2  # the work is really split


def test_shards_filters_and_per_image_with_pixels(data):
    store, source, records, root = data
    want = {r.mask_id for r in records if r.stage == "auto" and r.round == 1}
    samples = _read(MaskShardDataset(store, per="image", images=source, stage="auto", round=1), workers=2)
    assert sorted(m for s in samples for m in s["mask_ids"]) == sorted(want)
    assert len({s["image_id"] for s in samples}) == len(samples)  # round 1 has one shard: one sample per image
    for s in samples:
        expected = decode_image((root / "images" / s["image_id"]).read_bytes(), s["image_id"])
        assert s["image"].dtype == torch.uint8 and np.array_equal(s["image"].numpy(), expected)
        assert tuple(s["masks"].shape) == (len(s["mask_ids"]), *expected.shape[:2])


def test_sa1b_tars_workers_and_ranks_each_mask_once(data):
    store, _, _, root = data
    rows = _store_rows(store)
    tars = read_index(str(root / "sa1b"))["files"]
    assert len(tars) >= 3
    samples = _read(SA1BTarDataset(str(root / "sa1b"), per="mask"), workers=2)
    assert Counter(s["mask_id"] for s in samples) == Counter({m: 1 for m in rows})
    for s in samples:
        row = rows[s["mask_id"]]
        expected = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["rle"]}).astype(bool)
        assert np.array_equal(s["mask"].numpy(), expected)
    seen = Counter()
    for rank in range(3):  # 3 ranks x 2 workers = 6 readers over fewer tars: tars are shared by image
        ds = SA1BTarDataset(str(root / "sa1b"), per="image", rank=rank, world_size=3)
        for s in _read(ds, workers=2):
            seen.update(s["mask_ids"])
            expected = decode_image((root / "images" / s["image_id"]).read_bytes(), s["image_id"])
            assert np.array_equal(s["image"].numpy(), expected)
            assert s["masks"].shape[1:] == expected.shape[:2]
    assert seen == Counter({m: 1 for m in rows})


def test_sa1b_tar_failing_its_checksum_is_named(data, tmp_path):
    _, _, _, root = data
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root / "sa1b", copy)
    victim = read_index(str(copy))["files"][1]["path"]
    raw = bytearray((copy / victim).read_bytes())
    raw[100] ^= 0x01
    (copy / victim).write_bytes(bytes(raw))
    with pytest.raises(CorruptExportError, match=victim):
        list(SA1BTarDataset(str(copy), per="mask", decode=False))


def _dist_reader(rank: int, world_size: int, store_uri: str, init_file: str, out_dir: str) -> None:
    """One rank of a real torch.distributed (gloo) group, as Ray Train's TorchTrainer sets up: the dataset
    finds its rank from the process group, with no arguments."""
    import json as _json

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        # num_workers=1: the worker is spawned (the start method torch.multiprocessing.spawn leaves behind),
        # so it has no process group and must get the rank through pickling.
        ids = [s["mask_id"] for s in DataLoader(MaskShardDataset(store_uri, decode=False), batch_size=None,
                                                num_workers=1)]
        Path(out_dir, f"rank{rank}.json").write_text(_json.dumps(ids))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~30 s on 2 cores: 2 rank processes and their DataLoader workers all import torch
def test_ranks_from_a_real_process_group(data, tmp_path):
    store, _, _, root = data
    world = 2
    torch.multiprocessing.spawn(_dist_reader, args=(world, str(root / "store"), str(tmp_path / "init"),
                                                    str(tmp_path)), nprocs=world, join=True)
    import json

    seen = Counter()
    for rank in range(world):
        seen.update(json.loads((tmp_path / f"rank{rank}.json").read_text()))
    assert seen == Counter({m: 1 for m in _store_rows(store)})
