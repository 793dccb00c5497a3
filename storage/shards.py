"""The mask store: Parquet shards of `MaskRecord`s under one manifest.

Layout under the store's root (a local folder or s3://bucket/prefix):

    manifest.json                    the commit point: every visible shard with rows, bytes, sha256, schema version
    shards/<uuid>.parquet            one row per mask (`MASK_SCHEMA`), sorted by image_id, zstd: committed only
    staging/<commit>/<uuid>.parquet  shard files written, not yet committed (or committed, not yet moved)
    images/<uuid>.parquet            per commit: which images a stage finished (`IMAGES_SCHEMA`)

A writer (the driver's `MaskShardWriter`, or a worker with `write_part`) puts its shard files in
staging/ first; the commit swaps in a new manifest that lists them at their shards/ paths, then moves
them there (`_publish`). So `shards/*.parquet` — what DuckDB, pandas or Spark read with a plain glob —
holds exactly the committed data set: a writer killed before its commit leaves its files in staging/
(`collect_garbage` removes them), and one killed between the swap and the move leaves committed files
in staging/ that any later read, commit or `gc` moves into place (until then a glob misses them, it
never sees too much). The manifest is read-modify-written with a compare-and-swap
(`Store.write_if_version`): conditional PUT on S3, flock + compare locally; a committer that loses the
race re-reads and re-applies its change.

Every shard of one commit holds one (stage, round); so stage/round filters and image-id filters
prune whole shards from the manifest without opening them, and the other filters are pushed down
to Parquet row groups by pyarrow. The files are plain Parquet: `shard_paths()` can be handed to
pandas, pyarrow or DuckDB as they are.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from storage.backend import ConflictError, LocalStore, ObjectNotFound, Store, StoreError, open_store
from storage.records import MASK_SCHEMA, SCHEMA_VERSION, STAGES, MaskRecord, records_to_table
from storage import maintenance
from storage.manifest import (MANIFEST_KEY, SHARDS_DIR, IMAGES_DIR, COMMIT_RETRIES, IMAGES_SCHEMA, CorruptShardError, SchemaVersionError, ShardInfo, Manifest, staged_key, _file_sha256, _check_digest, _now_iso, _parquet_bytes, _as_list)

class MaskStore:
    """Parquet mask shards + manifest at `uri` (local folder or s3://bucket/prefix)."""

    def __init__(self, uri: str, s3_endpoint_url: str | None = None, shard_target_mb: float = 64,
                 s3_region: str | None = None, store: Store | None = None):
        self.uri = uri
        self.store = store or open_store(uri, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
        self.shard_target_bytes = max(1, int(shard_target_mb * 1024 * 1024))
        # (local path, size, mtime_ns, inode) -> the sha256 that file was checked against by this store: a file
        # is hashed once per MaskStore (one command, one stage run), not at every read
        self._verified: dict[tuple, str] = {}

    def __repr__(self) -> str:
        return f"MaskStore({self.store.uri!r})"

    # ------------------------------------------------------------ manifest

    def manifest(self) -> Manifest:
        data, _ = self.store.read_versioned(MANIFEST_KEY)
        if data is None:
            # committed data on disk without its manifest is not an empty store: files reach shards/ only after
            # a manifest listed them, and a first commit in flight has its index files only seconds old
            if self.store.list(SHARDS_DIR) or any(self._age(k) > 60 for k in self.store.list(IMAGES_DIR)[:16]):
                raise CorruptShardError(f"{self.store.url(MANIFEST_KEY)}: missing, but the store holds shard "
                                        f"files; recover it with `sa-engine store rebuild-manifest`")
            return Manifest()
        return Manifest.parse(data, self.store.url(MANIFEST_KEY))

    def shards(self) -> list[ShardInfo]:
        return self.manifest().shards

    def shard_paths(self) -> list[str]:
        """Local paths or s3:// URIs of the committed mask shards (for pandas / pyarrow / DuckDB)."""
        return [self.store.url(s.path) for s in self.shards()]

    def url(self, info: ShardInfo | str) -> str:
        return self.store.url(info if isinstance(info, str) else info.path)

    def _swap_manifest(self, add_shards: Sequence[ShardInfo], add_indexes: Sequence[ShardInfo],
                       commit: dict, remove: Sequence[str] = (), expect: int | None = None) -> Manifest:
        """Compare-and-swap the manifest: current + added - removed. With `expect` (a generation), raise
        ConflictError instead of retrying when someone else committed in between (upsert must redo)."""
        for attempt in range(COMMIT_RETRIES):
            data, version = self.store.read_versioned(MANIFEST_KEY)
            current = Manifest() if data is None else Manifest.parse(data, self.store.url(MANIFEST_KEY))
            if expect is not None and current.generation != expect:
                raise ConflictError(f"{self.store.url(MANIFEST_KEY)}: changed by another writer during upsert")
            gone = set(remove)
            new = Manifest(shards=[s for s in current.shards if s.path not in gone] + list(add_shards),
                           image_indexes=current.image_indexes + list(add_indexes),
                           generation=current.generation + 1, last_commit=commit)
            try:
                self.store.write_if_version(MANIFEST_KEY, new.to_bytes(), version)
                return new
            except ConflictError:
                if expect is not None:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * min(attempt + 1, 10))
        raise ConflictError(f"{self.store.url(MANIFEST_KEY)}: gave up after {COMMIT_RETRIES} concurrent commits")

    # ------------------------------------------------------------ writing

    def writer(self, stage: str, round: int, model_version: str | None) -> "MaskShardWriter":
        return MaskShardWriter(self, stage, round, model_version)

    def _write_table(self, table: pa.Table, folder: str, stage: str, round: int,
                     model_version: str | None, commit: str, kind: str = "append",
                     closing: dict | None = None) -> ShardInfo:
        """Sort by image_id, write one Parquet file (atomically) and describe it.

        The file carries its commit in its own metadata (`sa_engine_commit` …), and the last file of a
        commit (`closing`) how many files the commit has and which shards it replaces: from the files
        alone `rebuild_manifest` can tell a finished commit from a writer that died half-way."""
        table = table.sort_by([("image_id", "ascending")] + (
            [("mask_id", "ascending")] if "mask_id" in table.column_names else []))
        created = _now_iso()
        meta = dict(table.schema.metadata or {})
        meta.update({b"sa_engine_commit": commit.encode(), b"sa_engine_kind": kind.encode(),
                     b"sa_engine_stage": stage.encode(), b"sa_engine_round": str(int(round)).encode(),
                     b"sa_engine_model_version": json.dumps(model_version).encode(),
                     b"sa_engine_created_at": created.encode()})
        if closing is not None:
            meta[b"sa_engine_commit_files"] = str(int(closing["files"])).encode()
            meta[b"sa_engine_replaces"] = json.dumps(list(closing.get("replaces", []))).encode()
            meta[b"sa_engine_adopts"] = json.dumps(list(closing.get("adopts", []))).encode()
            meta[b"sa_engine_absorbs"] = json.dumps(dict(closing.get("absorbs", {}))).encode()
        table = table.replace_schema_metadata(meta)
        data = _parquet_bytes(table)
        ids = table.column("image_id")
        info = ShardInfo(path=f"{folder}/{uuid.uuid4().hex}.parquet", rows=table.num_rows,
                         sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                         stage=stage, round=int(round), model_version=model_version,
                         min_image_id=ids[0].as_py() if len(ids) else None,
                         max_image_id=ids[-1].as_py() if len(ids) else None,
                         commit=commit, created_at=created)
        # mask shards wait in staging/ until committed; image indexes are read through the manifest only
        self.store.write_bytes(staged_key(info) if folder == SHARDS_DIR else info.path, data)
        return info

    def write_part(self, records: Sequence[MaskRecord], stage: str, round: int,
                   model_version: str | None) -> ShardInfo:
        """A worker's shard: `records` as one staged file of a part of its own (no manifest change). The driver
        commits it with `MaskShardWriter.adopt(info)`; a part nobody adopts stays invisible and `gc` removes
        it. Returns the descriptor to hand back (path, rows, sha256, image id range: a few hundred bytes)."""
        if not records:
            raise ValueError("write_part: no records")
        _check_stage_round(records, stage, round)
        return self._write_table(records_to_table(list(records)), SHARDS_DIR, stage, round, model_version,
                                 f"part-{uuid.uuid4().hex}", kind="part")

    def _publish(self, infos: Iterable[ShardInfo]) -> None:
        """Move committed shard files from staging/ to their shards/ paths (idempotent: a file already moved
        is left as it is), then remove the staging folders this emptied."""
        folders = set()
        for info in infos:
            folders.add(staged_key(info).rsplit("/", 1)[0])
            try:
                self.store.move(staged_key(info), info.path)
            except ObjectNotFound:
                if not self.store.exists(info.path):
                    raise CorruptShardError(f"{self.store.url(info.path)}: listed in the manifest but missing "
                                            f"(nor in {self.store.url(staged_key(info))})") from None
        for folder in folders:
            self.store.remove_empty_folder(folder)

    def _drop_staged(self, infos: Iterable[ShardInfo]) -> None:
        """Delete uncommitted staged files (best effort: leftovers are invisible and `gc` removes them)."""
        for info in infos:
            key = staged_key(info) if info.path.startswith(SHARDS_DIR + "/") else info.path
            try:
                self.store.delete(key)
                self.store.remove_empty_folder(key.rsplit("/", 1)[0])
            except StoreError:
                pass

    def _key_of(self, info: ShardInfo) -> str:
        """The key to read a committed file from: its shards/ path; a commit cut off before its files moved is
        finished here (or, where this process may not write, read from staging/)."""
        if not info.path.startswith(SHARDS_DIR + "/") or self.store.exists(info.path):
            return info.path
        if not self.store.exists(staged_key(info)):
            raise CorruptShardError(f"{self.store.url(info.path)}: listed in the manifest but missing")
        try:
            self._publish([info])
            return info.path
        except StoreError:
            return staged_key(info)

    def upsert(self, records: Sequence[MaskRecord], stage: str, round: int,
               model_version: str | None) -> list[ShardInfo]:
        """Add or replace masks by mask_id (latest wins). Shards holding an older version are rewritten
        without it; the replaced versions are summarised in the new record's `history` (JSON list).
        Returns the shards written (rewritten ones and the new one)."""
        _check_stage_round(records, stage, round)
        latest = {r.mask_id: r for r in records}  # within one call, the last one wins too
        for _ in range(COMMIT_RETRIES):
            manifest = self.manifest()
            wanted = pa.array(sorted(latest), pa.string())
            image_ids = sorted({r.image_id for r in latest.values()})
            commit = uuid.uuid4().hex
            written: list[ShardInfo] = []
            replaced: list[ShardInfo] = []
            history: dict[str, list] = {}
            try:
                for info in self._prune(manifest.shards, image_ids=image_ids):
                    table = self._read_shard(info, None, None)
                    hit = pc.is_in(table.column("mask_id"), value_set=wanted)
                    if not pc.any(hit).as_py():
                        continue
                    replaced.append(info)
                    for row in table.filter(hit).to_pylist():
                        history.setdefault(row["mask_id"], []).extend(_history_entries(row, info))
                    kept = table.filter(pc.invert(hit))
                    if kept.num_rows:
                        written.append(self._write_table(kept, SHARDS_DIR, info.stage, info.round,
                                                         info.model_version, commit, kind="upsert"))
                new_records = []
                for r in latest.values():
                    if r.mask_id in history:
                        r = _with_history(r, history[r.mask_id])
                    new_records.append(r)
                written.append(self._write_table(  # the commit's last file: it closes the commit
                    records_to_table(new_records), SHARDS_DIR, stage, round, model_version, commit, kind="upsert",
                    closing={"files": len(written) + 1, "replaces": [s.path for s in replaced],
                             "absorbs": self._absorbs(replaced)}))
                self._swap_manifest(written, [], {"id": commit, "kind": "upsert", "time": _now_iso(),
                                                  "stage": stage, "round": int(round),
                                                  "model_version": model_version, "rows": len(new_records),
                                                  "replaced_shards": [s.path for s in replaced]},
                                    remove=[s.path for s in replaced], expect=manifest.generation)
            except ConflictError:
                self._drop_staged(written)
                time.sleep(random.uniform(0.01, 0.1))
                continue
            except BaseException:
                self._drop_staged(written)
                raise
            self._publish(written)
            for info in replaced:  # no longer referenced (nor globbed); readers holding the old manifest re-read
                self.store.delete(info.path)
            return written
        raise ConflictError(f"{self.store.url(MANIFEST_KEY)}: upsert gave up after {COMMIT_RETRIES} conflicts")

    def _absorbs(self, replaced: Sequence[ShardInfo]) -> dict[str, int]:
        """{commit: files} a commit replacing `replaced` absorbs, for `rebuild_manifest`: their own commits, and
        (carried forward) the commits a replaced closing file had absorbed itself."""
        out: dict[str, int] = {}
        for info in replaced:
            if info.commit:
                out[info.commit] = out.get(info.commit, 0) + 1
            meta = self._fragment(info).physical_schema.metadata or {}
            for c, n in json.loads(meta.get(b"sa_engine_absorbs", b"{}")).items():
                out[c] = out.get(c, 0) + int(n)
        return out





    def _age(self, key: str, now: float | None = None) -> float:
        """Seconds since `key` was last written."""
        now = time.time() if now is None else now
        if isinstance(self.store, LocalStore):
            return now - os.stat(self.store.url(key)).st_mtime
        head = self.store.client.head_object(Bucket=self.store.bucket, Key=self.store._key(key))
        return now - head["LastModified"].timestamp()

    # ------------------------------------------------------------ reading

    def _prune(self, shards: Iterable[ShardInfo], stage=None, round=None, image_ids=None) -> list[ShardInfo]:
        """Shards that can hold matching rows, judged from the manifest alone."""
        stages = None if stage is None else set(_as_list(stage))
        lo, hi = _round_range(round)
        ids = None if image_ids is None else sorted(set(image_ids))
        out = []
        for s in shards:
            if stages is not None and s.stage not in stages:
                continue
            if lo is not None and not (lo <= s.round <= hi):
                continue
            if ids is not None:
                if s.min_image_id is None or not ids:
                    continue
                i = bisect.bisect_left(ids, s.min_image_id)
                if i == len(ids) or ids[i] > s.max_image_id:
                    continue
            out.append(s)
        return out

    def _source(self, info: ShardInfo):
        """What pyarrow opens, its sha256 checked against the manifest first: the local path (hashed once per
        MaskStore while the file stays the same), or the S3 object's bytes. Parquet's own checks miss most
        single-byte flips in the data pages, which would come back as silently altered rows."""
        key = info.path
        try:
            size = self.store.size(key)
        except ObjectNotFound:
            key = self._key_of(info)
            size = self.store.size(key)
        url = self.store.url(key)
        if size != info.bytes:
            raise CorruptShardError(f"{url}: {size} bytes, manifest says {info.bytes} (truncated or replaced)")
        if isinstance(self.store, LocalStore):
            st = os.stat(url)
            stamp = (url, st.st_size, st.st_mtime_ns, st.st_ino)
            if self._verified.get(stamp) != info.sha256:
                _check_digest(url, _file_sha256(url), info)
                self._verified[stamp] = info.sha256
            return url, pafs.LocalFileSystem()
        data = self.store.read_bytes(key)
        _check_digest(url, hashlib.sha256(data).hexdigest(), info)
        return pa.BufferReader(data), None

    def _fragment(self, info: ShardInfo):
        url = self.store.url(info.path)
        if info.schema_version > SCHEMA_VERSION:
            raise SchemaVersionError(f"{url}: written with schema version {info.schema_version}, this "
                                     f"sa-engine reads up to {SCHEMA_VERSION}; upgrade sa-engine")
        source, filesystem = self._source(info)
        try:
            fragment = ds.ParquetFileFormat().make_fragment(source, filesystem=filesystem)
            meta = fragment.physical_schema.metadata or {}
        except (pa.ArrowInvalid, OSError) as e:
            raise CorruptShardError(f"{url}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        version = int(meta.get(b"sa_engine_schema_version", b"0"))
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(f"{url}: written with schema version {version}, this sa-engine reads "
                                     f"up to {SCHEMA_VERSION}; upgrade sa-engine")
        return fragment

    def _read_shard(self, info: ShardInfo, columns, expr, schema: pa.Schema = MASK_SCHEMA) -> pa.Table:
        fragment = self._fragment(info)
        try:
            return fragment.to_table(schema=schema, columns=columns, filter=expr)
        except (pa.ArrowInvalid, OSError) as e:
            raise CorruptShardError(f"{self.store.url(info.path)}: cannot decode ({str(e).splitlines()[0]})") from None

    def iter_batches(self, columns: list[str] | None = None, stage: str | list[str] | None = None,
                     round: int | tuple[int, int] | None = None, verified: bool | None = None,
                     min_predicted_iou: float | None = None, min_stability_score: float | None = None,
                     image_ids: Iterable[str] | None = None, model_version: str | None = None,
                     origin: str | list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream matching rows shard by shard (memory: one row group at a time)."""
        image_ids = None if image_ids is None else sorted(set(image_ids))
        expr = _filter_expr(stage, round, verified, min_predicted_iou, min_stability_score, image_ids,
                            model_version, origin)
        for info in self._prune(self.shards(), stage, round, image_ids):
            fragment = self._fragment(info)
            try:
                for batch in fragment.to_batches(schema=MASK_SCHEMA, columns=columns, filter=expr):
                    if batch.num_rows:
                        yield batch
            except (pa.ArrowInvalid, OSError) as e:
                raise CorruptShardError(
                    f"{self.store.url(info.path)}: cannot decode ({str(e).splitlines()[0]})") from None

    def read_table(self, columns: list[str] | None = None, **filters) -> pa.Table:
        """All matching rows as one table (filters as in `iter_batches`)."""
        schema = MASK_SCHEMA if columns is None else pa.schema([MASK_SCHEMA.field(c) for c in columns])
        batches = list(self.iter_batches(columns=columns, **filters))
        return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()

    def iter_records(self, **filters) -> Iterator[MaskRecord]:
        for batch in self.iter_batches(**filters):
            for row in batch.to_pylist():
                yield MaskRecord.from_row(row)

    def images_table(self, stage: str | list[str] | None = None, model_version: str | None = None,
                     round: int | tuple[int, int] | None = None) -> pa.Table:
        """Rows of the per-commit image indexes (`IMAGES_SCHEMA`) matching the filters."""
        expr = None
        if model_version is not None:
            expr = pc.field("model_version") == model_version
        tables = [self._read_shard(info, None, expr, IMAGES_SCHEMA)
                  for info in self._prune(self.manifest().image_indexes, stage, round)]
        return pa.concat_tables(tables) if tables else IMAGES_SCHEMA.empty_table()

    def images_done(self, stage: str, model_version: str | None = None,
                    round: int | tuple[int, int] | None = None) -> set[str]:
        """Image ids a committed `stage` run finished (optionally only for one model version / round)."""
        return set(self.images_table(stage, model_version, round).column("image_id").to_pylist())

    def locate(self, mask_id: str, image_id: str) -> str | None:
        """The URL of the committed shard holding `mask_id` (of `image_id`), or None: for messages about one row."""
        for info in self._prune(self.manifest().shards, image_ids=[image_id]):
            ids = self._read_shard(info, ["mask_id"], pc.field("mask_id") == mask_id)
            if ids.num_rows:
                return self.url(info)
        return None

    # ---- maintenance (storage/maintenance.py), offered here so a caller holds one object

    def compact(self, small_fraction: float = 0.25, dry_run: bool = False) -> dict:
        return maintenance.compact(self, small_fraction, dry_run)

    def collect_garbage(self, min_age_s: float = 3600.0) -> list[str]:
        return maintenance.collect_garbage(self, min_age_s)

    def verify(self, unlisted_grace_s: float = 60.0) -> None:
        maintenance.verify(self, unlisted_grace_s)

    def verify_deep(self, image_sizes=None, limit: int = 100) -> list[str]:
        return maintenance.verify_deep(self, image_sizes, limit)

    def rebuild_manifest(self, dry_run: bool = False) -> dict:
        return maintenance.rebuild_manifest(self, dry_run)


class MaskShardWriter:
    """Buffers records of one (stage, round, model_version), writes shards of about the target size,
    and makes them visible on `commit()`. Use as a context manager: leaving the block by an
    exception discards what was not committed; leaving it normally commits what is pending."""

    def __init__(self, mask_store: MaskStore, stage: str, round: int, model_version: str | None):
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r}: not one of {STAGES}")
        self.mask_store = mask_store
        self.stage, self.round, self.model_version = stage, int(round), model_version
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._written: list[ShardInfo] = []
        self._adopted: list[ShardInfo] = []  # workers' parts (`MaskStore.write_part`) this commit takes in
        self._images: list[dict] = []
        self._bytes_ratio = 0.5  # Parquet bytes per in-memory Arrow byte, learnt from each shard written
        self._commit = uuid.uuid4().hex

    def __enter__(self) -> "MaskShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._pending or self._written or self._adopted or self._images:
            self.commit()

    def add(self, records: Sequence[MaskRecord]) -> None:
        if not records:
            return
        _check_stage_round(records, self.stage, self.round)
        table = records_to_table(list(records))
        self._pending.append(table)
        self._pending_bytes += table.nbytes
        if self._pending_bytes * self._bytes_ratio >= self.mask_store.shard_target_bytes:
            self._flush()

    def adopt(self, part: ShardInfo) -> None:
        """Take a worker's staged shard (`MaskStore.write_part`) into this commit, as it is: its masks travel no
        further than the store."""
        if (part.stage, part.round, part.model_version) != (self.stage, self.round, self.model_version):
            raise ValueError(f"part {part.path}: stage/round/model {part.stage}/{part.round}/{part.model_version} "
                             f"differs from the writer's {self.stage}/{self.round}/{self.model_version}")
        self._adopted.append(part)

    def image_done(self, image_id: str, n_masks: int) -> None:
        """Record that this stage finished `image_id` (visible after commit, for resuming runs)."""
        self._images.append({"image_id": image_id, "stage": self.stage, "round": self.round,
                             "model_version": self.model_version, "n_masks": int(n_masks),
                             "commit": self._commit, "done_at": datetime.now(timezone.utc)})

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        info = self.mask_store._write_table(table, SHARDS_DIR, self.stage, self.round, self.model_version,
                                            self._commit)
        self._bytes_ratio = max(0.05, info.bytes / max(1, table.nbytes))
        self._written.append(info)
        self._pending, self._pending_bytes = [], 0

    def commit(self) -> list[ShardInfo]:
        """Write what is buffered, then the image index, then the manifest (the commit point)."""
        try:
            self._flush()
            # the image index is written last, even when empty: it closes the commit (see _write_table)
            indexes = [self.mask_store._write_table(
                pa.Table.from_pylist(self._images, schema=IMAGES_SCHEMA), IMAGES_DIR, self.stage,
                self.round, self.model_version, self._commit, kind="index",
                closing={"files": len(self._written) + 1, "adopts": [p.commit for p in self._adopted]})]
            shards = self._written + self._adopted
            rows = sum(s.rows for s in shards)
            self.mask_store._swap_manifest(shards, indexes, {
                "id": self._commit, "kind": "append", "time": _now_iso(), "stage": self.stage,
                "round": self.round, "model_version": self.model_version, "rows": rows,
                "images": len(self._images), "parts": len(self._adopted)})
        except BaseException:
            self.abort()
            raise
        self.mask_store._publish(shards)
        committed = shards
        self._written, self._adopted, self._images = [], [], []
        self._commit = uuid.uuid4().hex
        return committed

    def abort(self) -> None:
        """Drop everything not yet committed (staged files are deleted, adopted parts too; none was visible)."""
        self.mask_store._drop_staged(self._written + self._adopted)
        self._pending, self._pending_bytes, self._written, self._adopted, self._images = [], 0, [], [], []


def _check_stage_round(records: Sequence[MaskRecord], stage: str, round: int) -> None:
    for r in records:
        if r.stage != stage or int(r.round) != int(round):
            raise ValueError(f"mask {r.mask_id} of image {r.image_id}: stage/round {r.stage}/{r.round} "
                             f"differs from the writer's {stage}/{round}")


def _round_range(round) -> tuple[int | None, int | None]:
    if round is None:
        return None, None
    if isinstance(round, (tuple, list)):
        return int(round[0]), int(round[1])
    return int(round), int(round)


def _filter_expr(stage, round, verified, min_predicted_iou, min_stability_score, image_ids,
                 model_version, origin) -> ds.Expression | None:
    """The row-level filter pyarrow pushes down to row groups (statistics) and then applies."""
    parts = []
    if stage is not None:
        parts.append(pc.field("stage").isin(_as_list(stage)))
    lo, hi = _round_range(round)
    if lo is not None:
        parts.append((pc.field("round") >= lo) & (pc.field("round") <= hi))
    if verified is not None:
        parts.append(pc.field("verified") == bool(verified))
    # Scores are stored as float32: compare in float32, so a threshold of 0.88 keeps a stored 0.88.
    if min_predicted_iou is not None:
        parts.append(pc.field("predicted_iou") >= pa.scalar(float(min_predicted_iou), pa.float32()))
    if min_stability_score is not None:
        parts.append(pc.field("stability_score") >= pa.scalar(float(min_stability_score), pa.float32()))
    if image_ids is not None:
        parts.append(pc.field("image_id").isin(list(image_ids)))
    if model_version is not None:
        parts.append(pc.field("model_version") == model_version)
    if origin is not None:
        parts.append(pc.field("origin").isin(_as_list(origin)))
    expr = None
    for p in parts:
        expr = p if expr is None else expr & p
    return expr


def _history_entries(row: dict, shard: ShardInfo) -> list:
    """What survives of a replaced version: its own history plus one summary of itself."""
    earlier = json.loads(row["history"]) if row.get("history") else []
    created = row["created_at"]
    return earlier + [{
        "version": f"{shard.path}#{created.isoformat() if created else ''}",
        "stage": row["stage"], "round": row["round"], "model_version": row["model_version"],
        "origin": row["origin"], "annotator": row["annotator"], "verified": row["verified"],
        "area": row["area"], "predicted_iou": row["predicted_iou"],
        "rle_sha1": hashlib.sha1(row["rle"]).hexdigest()[:16],
        "created_at": created.isoformat() if created else None,
        "replaced_at": _now_iso(),
    }]


def _with_history(record: MaskRecord, replaced: list) -> MaskRecord:

    # A caller that read the record back may pass its old history along: don't repeat it.
    return replace(record, history=replaced + [h for h in (record.history or []) if h not in replaced])
