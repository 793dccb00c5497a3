"""The mask store's maintenance, apart from reading and writing it: compact small shards, collect garbage, verify
(quick and deep), rebuild a lost or damaged manifest from the files. `MaskStore` offers each as a method."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from storage.backend import ConflictError, LocalStore, ObjectNotFound, StoreError
from storage.rle import compressed_counts, rle_problem

from storage.manifest import (MANIFEST_KEY, SHARDS_DIR, IMAGES_DIR, STAGING_DIR, COMMIT_RETRIES, CorruptShardError, ShardInfo, Manifest, staged_key, _check_digest, _now_iso, _finished_files)

def compact(store: "MaskStore", small_fraction: float = 0.25, dry_run: bool = False) -> dict:
    """Rewrite many small shards as few large ones: per (stage, round, model_version), the shards under
    `small_fraction` of the target size are merged (in order) into files of about the target size, each
    merge one commit that replaces them (as an upsert does: the rows, their ids and lineage unchanged; the
    image indexes untouched). Returns {groups, shards_before, shards_after, rows, written}. A writer
    committing meanwhile is not disturbed: a merge that loses the manifest race is redone."""
    limit = store.shard_target_bytes * small_fraction
    groups: dict[tuple, list[ShardInfo]] = {}
    for info in store.shards():
        if info.bytes < limit and info.path.startswith(SHARDS_DIR + "/"):
            groups.setdefault((info.stage, info.round, info.model_version), []).append(info)
    plans = []  # runs of small shards, each about one target size
    for key, infos in groups.items():
        run: list[ShardInfo] = []
        for info in infos:
            run.append(info)
            if sum(x.bytes for x in run) >= store.shard_target_bytes:
                plans.append((key, run))
                run = []
        plans.append((key, run))
    plans = [(key, run) for key, run in plans if len(run) > 1]
    before = len(store.shards())
    if dry_run:
        return {"groups": len(plans), "shards_before": before,
                "shards_after": before - sum(len(r) - 1 for _, r in plans),
                "rows": sum(x.rows for _, r in plans for x in r), "written": False}
    rows = 0
    for (stage, rnd, model_version), run in plans:
        for _ in range(COMMIT_RETRIES):
            manifest = store.manifest()
            live = {x.path for x in manifest.shards}
            run = [x for x in run if x.path in live]
            if len(run) < 2:
                break
            commit = uuid.uuid4().hex
            table = pa.concat_tables([store._read_shard(x, None, None) for x in run])
            info = store._write_table(table, SHARDS_DIR, stage, rnd, model_version, commit, kind="compact",
                                     closing={"files": 1, "replaces": [x.path for x in run],
                                              "absorbs": store._absorbs(run)})
            try:
                store._swap_manifest([info], [], {"id": commit, "kind": "compact", "time": _now_iso(),
                                                 "stage": stage, "round": int(rnd), "rows": table.num_rows,
                                                 "replaced_shards": [x.path for x in run]},
                                    remove=[x.path for x in run], expect=manifest.generation)
            except ConflictError:
                store._drop_staged([info])
                continue
            store._publish([info])
            for x in run:
                store.store.delete(x.path)
            rows += table.num_rows
            break
    return {"groups": len(plans), "shards_before": before, "shards_after": len(store.shards()), "rows": rows,
            "written": True}


def collect_garbage(store: "MaskStore", min_age_s: float = 3600.0) -> list[str]:
    """Delete shard/index files no manifest lists (left by crashed writers) older than `min_age_s`.
    Younger ones may belong to a writer that is about to commit. Returns the deleted keys.

    A file that a finished commit wrote is never deleted, listed or not (the rule `rebuild_manifest` uses):
    when the manifest misses such files it is damaged, and this raises CorruptShardError, deleting
    nothing, so that `rebuild-manifest` can still bring those masks back."""
    manifest = store.manifest()
    live = {s.path for s in manifest.shards} | {s.path for s in manifest.image_indexes}
    unmoved = {staged_key(s): s for s in manifest.shards}  # committed, cut off before the move
    now = time.time()
    candidates = []
    for key in store.store.list(SHARDS_DIR) + store.store.list(IMAGES_DIR) + store.store.list(STAGING_DIR):
        if key in live:
            continue
        if key in unmoved:
            store._publish([unmoved[key]])
            continue
        if store._age(key, now) >= min_age_s:
            candidates.append(key)
    if candidates:
        unlisted = unlisted_committed(store, manifest, candidates)
        if unlisted:
            raise CorruptShardError(
                f"{store.store.url(MANIFEST_KEY)}: {len(unlisted)} file(s) of finished commits are not in the "
                f"manifest (first: {store.store.url(unlisted[0])}); gc deleted nothing. Recover them with "
                f"`sa-engine store rebuild-manifest`, then run gc again")
    deleted = []
    for key in candidates:
        store.store.delete(key)
        deleted.append(key)
    if isinstance(store.store, LocalStore):  # half-written files of killed atomic writes (".name.<id>.tmp")
        for path in store.store.root.rglob(".*.tmp"):
            if path.is_file() and now - path.stat().st_mtime >= min_age_s:
                path.unlink(missing_ok=True)
                deleted.append(path.relative_to(store.store.root).as_posix())
    remove_empty_staging(store, min_age_s)
    return deleted


def remove_empty_staging(store: "MaskStore", min_age_s: float = 0.0) -> None:
    """Remove staging/<commit>/ folders left empty (their files committed and moved, or collected)."""
    if isinstance(store.store, LocalStore):
        staging = store.store.root / STAGING_DIR
        for folder in (staging.iterdir() if staging.is_dir() else ()):
            if folder.is_dir():
                store.store.remove_empty_folder(f"{STAGING_DIR}/{folder.name}", min_age_s)


def unlisted_committed(store: "MaskStore", manifest: Manifest, keys: Sequence[str] | None = None) -> list[str]:
    """Keys (of `keys`, or of all files) that a finished, unreplaced commit wrote but `manifest` does not
    list: by the `rebuild_manifest` rule, from the files' own metadata (footers only)."""
    files, _ = scan_files(store, with_digest=False)
    kept, _ = _finished_files(files)
    listed = {s.path for s in manifest.shards + manifest.image_indexes} | {staged_key(s) for s in manifest.shards}
    wanted = None if keys is None else set(keys)
    return sorted(f["key"] for f in kept
                  if f["key"] not in listed and f["info"].path not in listed
                  and (wanted is None or f["key"] in wanted))


def verify(store: "MaskStore", unlisted_grace_s: float = 60.0) -> None:
    """Re-hash every committed file and compare its row count with the manifest's; then look for files of
    finished commits that the manifest does not list (a manifest that lost an entry, still valid JSON).
    Raises CorruptShardError naming the first problem. Files younger than `unlisted_grace_s` may belong to
    a commit in flight and are not counted as unlisted."""
    manifest = store.manifest()
    for info in manifest.shards + manifest.image_indexes:
        url = store.store.url(info.path)
        try:
            data = store.store.read_bytes(info.path)
        except ObjectNotFound:
            data = store.store.read_bytes(store._key_of(info))
        _check_digest(url, hashlib.sha256(data).hexdigest(), info)
        rows = store._fragment(info).count_rows()  # also the schema version of the file itself
        if rows != info.rows:
            raise CorruptShardError(f"{url}: {rows} rows, the manifest says {info.rows}; recover it with "
                                    f"`sa-engine store rebuild-manifest`")
    now = time.time()
    unlisted = [k for k in unlisted_committed(store, manifest) if store._age(k, now) >= unlisted_grace_s]
    if unlisted:
        raise CorruptShardError(
            f"{store.store.url(unlisted[0])}: written by a finished commit but not in the manifest "
            f"({len(unlisted)} such file(s)): the manifest is damaged; recover it with "
            f"`sa-engine store rebuild-manifest`")


def verify_deep(store: "MaskStore", image_sizes=None, limit: int = 100) -> list[str]:
    """`verify`, then every row: its RLE decodes to exactly (height, width) pixels, its area matches, and
    (with `image_sizes`, a function image_id -> (H, W) or None) its size is the image's. Returns one line
    per problem ('<shard> mask <id>: <reason>'), at most `limit`; raises CorruptShardError when a file
    itself is damaged (as `verify`)."""
    verify(store)
    problems: list[str] = []
    sizes: dict[str, tuple | None] = {}
    for info in store.shards():
        table = store._read_shard(info, ["image_id", "mask_id", "height", "width", "rle", "area"], None)
        for row in table.to_pylist():
            where = f"{store.url(info)} mask {row['mask_id']}"
            problem = rle_problem(row["rle"], row["height"], row["width"])
            if problem is None:
                runs = compressed_counts(row["rle"])
                if int(runs[1::2].sum()) != row["area"]:
                    problem = f"area {row['area']} but the RLE holds {int(runs[1::2].sum())} pixels"
            if problem is None and image_sizes is not None:
                if row["image_id"] not in sizes:
                    sizes[row["image_id"]] = image_sizes(row["image_id"])
                size = sizes[row["image_id"]]
                if size is not None and tuple(size) != (row["height"], row["width"]):
                    problem = (f"mask is {row['height']}x{row['width']} but image {row['image_id']} is "
                               f"{size[0]}x{size[1]}")
            if problem:
                problems.append(f"{where}: {problem}")
                if len(problems) >= limit:
                    return problems
    return problems


def rebuild_manifest(store: "MaskStore", dry_run: bool = False) -> dict:
    """Recover a lost or damaged manifest from the files on disk.

    The rule (`_finished_files`): a file names its commit in its metadata, and a commit's last file says how
    many files the commit has and which shards it replaced. A commit whose files are all there is kept (its
    shards, minus those a kept commit replaced); a commit with files missing (a writer that died before its
    commit) and unreadable files are left out and listed. Files written before commits were recorded (no
    metadata) are kept as they are. The old manifest, if any, is kept beside as manifest.json.damaged-*.
    Workers' parts (`write_part`) count when a finished commit's last file adopts them. Committed files
    still in staging/ are moved to shards/ (unless dry_run).
    Returns {shards, image_indexes, rows, left_out: [{path, reason}], written}."""
    files, left_out = scan_files(store, with_digest=True)
    kept, unfinished = _finished_files(files)
    left_out += unfinished
    old, version = store.store.read_versioned(MANIFEST_KEY)
    try:
        generation = Manifest.parse(old, "").generation + 1 if old is not None else 1
    except StoreError:
        generation = 1
    manifest = Manifest(shards=[f["info"] for f in kept if f["folder"] == SHARDS_DIR],
                        image_indexes=[f["info"] for f in kept if f["folder"] == IMAGES_DIR],
                        generation=generation,
                        last_commit={"id": uuid.uuid4().hex, "kind": "rebuild", "time": _now_iso(),
                                     "left_out": len(left_out)})
    if not dry_run:
        store._publish([f["info"] for f in kept if f.get("staged")])
        if old is not None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            store.store.write_bytes(f"{MANIFEST_KEY}.damaged-{stamp}", old)
        store.store.write_if_version(MANIFEST_KEY, manifest.to_bytes(), version)
    return {"shards": len(manifest.shards), "image_indexes": len(manifest.image_indexes),
            "rows": sum(s.rows for s in manifest.shards), "left_out": left_out, "written": not dry_run}


def scan_files(store: "MaskStore", with_digest: bool) -> tuple[list[dict], list[dict]]:
    """Every Parquet file under shards/, images/ and staging/ with what its own metadata says (commit,
    stage, round, closing facts): ([{key, folder, staged, meta, info}], unreadable [{path, reason}]).
    `with_digest`: read each file whole for its sha256 and image-id range (what a manifest entry needs);
    else only its footer."""
    files, left_out = [], []
    for folder in (SHARDS_DIR, IMAGES_DIR, STAGING_DIR):
        for key in store.store.list(folder):
            if not key.endswith(".parquet"):
                continue
            digest, first, size = "", [], 0
            try:
                if with_digest:
                    data = store.store.read_bytes(key)
                    pf = pq.ParquetFile(pa.BufferReader(data))
                    first = pf.read(columns=["image_id"]).column("image_id").to_pylist()
                    digest, size = hashlib.sha256(data).hexdigest(), len(data)
                else:
                    with store.store.open_read(key) as fh:
                        pf = pq.ParquetFile(fh)
                meta = pf.schema_arrow.metadata or {}
                rows = pf.metadata.num_rows
            except (pa.ArrowInvalid, OSError) as e:
                left_out.append({"path": key, "reason": f"not a readable Parquet file ({str(e).splitlines()[0]})"})
                continue
            staged = folder == STAGING_DIR
            f = {"key": key, "folder": SHARDS_DIR if staged else folder, "staged": staged,
                 "meta": {k.decode(): v.decode() for k, v in meta.items()},
                 "info": ShardInfo(
                     path=f"{SHARDS_DIR}/{key.rsplit('/', 1)[-1]}" if staged else key, rows=rows,
                     sha256=digest, bytes=size, stage="", round=0, model_version=None,
                     schema_version=int(meta.get(b"sa_engine_schema_version", b"0")),
                     min_image_id=min(first) if first else None, max_image_id=max(first) if first else None)}
            m = f["meta"]
            f["info"].commit, f["info"].created_at = m.get("sa_engine_commit"), m.get("sa_engine_created_at")
            if "sa_engine_commit" not in m:  # written before commits were recorded: keep it as it is
                f["info"].stage, f["info"].round, f["info"].model_version = legacy_identity(store, key)
            else:
                f["info"].stage, f["info"].round = m["sa_engine_stage"], int(m["sa_engine_round"])
                f["info"].model_version = json.loads(m["sa_engine_model_version"])
            files.append(f)
    return files, left_out


def legacy_identity(store: "MaskStore", key: str) -> tuple[str, int, str | None]:
    """(stage, round, model_version) of a file without commit metadata, from its first row."""
    t = pq.read_table(pa.BufferReader(store.store.read_bytes(key)), columns=["stage", "round", "model_version"])
    if t.num_rows == 0:
        return "manual", 0, None
    row = t.slice(0, 1).to_pylist()[0]
    return row["stage"], int(row["round"]), row["model_version"]
