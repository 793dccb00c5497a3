"""The mask store's manifest and its shard descriptors (storage/shards.py: the layout), the errors a read raises,
and the commit rule that says which files a finished commit wrote."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from storage.backend import StoreError
from storage.records import SCHEMA_VERSION


MANIFEST_KEY = "manifest.json"
MANIFEST_FORMAT = "sa-engine-mask-store"
MANIFEST_VERSION = 1  # the layout of manifest.json itself
SHARDS_DIR, IMAGES_DIR, STAGING_DIR = "shards", "images", "staging"
ROW_GROUP_ROWS = 8192  # the unit predicate pushdown can skip
COMMIT_RETRIES = 50

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("stage", pa.string()),
        ("round", pa.int32()),
        ("model_version", pa.string()),
        ("n_masks", pa.int32()),
        ("commit", pa.string()),
        ("done_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={b"sa_engine_schema_version": str(SCHEMA_VERSION).encode()},
)


class CorruptShardError(StoreError):
    """A shard (or the manifest) disagrees with what the manifest promises; the message names it."""

class SchemaVersionError(StoreError):
    """A shard or manifest written by a newer sa-engine than this one."""

@dataclass
class ShardInfo:
    """One committed file. `path` is the key under the store's root (see `MaskStore.url`)."""

    path: str
    rows: int
    sha256: str
    bytes: int
    stage: str
    round: int
    model_version: str | None
    schema_version: int = SCHEMA_VERSION
    min_image_id: str | None = None
    max_image_id: str | None = None
    commit: str | None = None
    created_at: str | None = None

    @classmethod
    def from_json(cls, d: dict) -> "ShardInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Manifest:
    shards: list[ShardInfo] = field(default_factory=list)
    image_indexes: list[ShardInfo] = field(default_factory=list)
    generation: int = 0
    last_commit: dict | None = None

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": MANIFEST_FORMAT,
            "manifest_version": MANIFEST_VERSION,
            "schema_version": SCHEMA_VERSION,
            "generation": self.generation,
            "updated_at": datetime.now(timezone.utc).isoformat(),
            "last_commit": self.last_commit,
            "shards": [asdict(s) for s in self.shards],
            "image_indexes": [asdict(s) for s in self.image_indexes],
        }, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptShardError(f"{where}: manifest is not valid JSON ({e}); recover it with "
                                    f"`sa-engine store rebuild-manifest`") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise CorruptShardError(f"{where}: not an sa-engine mask store manifest")
        if int(d.get("manifest_version", 0)) > MANIFEST_VERSION:
            raise SchemaVersionError(f"{where}: manifest version {d['manifest_version']} is newer than this "
                                     f"sa-engine reads ({MANIFEST_VERSION}); upgrade sa-engine")
        try:
            return cls(shards=[ShardInfo.from_json(s) for s in d.get("shards", [])],
                       image_indexes=[ShardInfo.from_json(s) for s in d.get("image_indexes", [])],
                       generation=int(d.get("generation", 0)), last_commit=d.get("last_commit"))
        except (TypeError, ValueError) as e:
            raise CorruptShardError(f"{where}: malformed shard entry in manifest ({e}); recover it with "
                                    f"`sa-engine store rebuild-manifest`") from None


def staged_key(info: ShardInfo) -> str:
    """Where a shard file waits before (and just after) its commit: staging/<its commit>/<its name>."""
    return f"{STAGING_DIR}/{info.commit}/{info.path.rsplit('/', 1)[-1]}"


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(url: str, digest: str, info: "ShardInfo") -> None:
    if digest != info.sha256:
        raise CorruptShardError(f"{url}: sha256 {digest[:12]}… does not match the manifest's {info.sha256[:12]}… "
                                f"(corrupted or replaced)")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_statistics=True,
                   use_dictionary=["image_id", "stage", "origin", "model_version", "annotator"]
                   if "origin" in table.column_names else ["image_id", "stage", "model_version"])
    return sink.getvalue().to_pybytes()


def _as_list(v) -> list:
    return [v] if isinstance(v, str) else list(v)


def _finished_files(files: list[dict]) -> tuple[list[dict], list[dict]]:
    """Of `MaskStore._scan_files`' files, (those the finished commits keep, [{path, reason}] of the rest).

    A commit is finished when all its files are there, or when a finished later commit adopted its part or
    replaced some of its files (an upsert or a compaction says whose files it absorbed): a file can only be
    replaced once the manifest listed it. Later commits vouch for earlier ones: a fixed point. Files written
    before commits were recorded (no metadata) are each a finished commit of their own."""
    commits: dict[str, list[dict]] = {}
    for f in files:
        m = f["meta"]
        if "sa_engine_commit" not in m:
            commits[f"legacy:{f['key']}"] = [dict(f, closing=1)]
            continue
        if "sa_engine_commit_files" in m:
            f = dict(f, closing=int(m["sa_engine_commit_files"]),
                     replaces=json.loads(m.get("sa_engine_replaces", "[]")),
                     adopts=json.loads(m.get("sa_engine_adopts", "[]")),
                     absorbs=json.loads(m.get("sa_engine_absorbs", "{}")))
        commits.setdefault(m["sa_engine_commit"], []).append(f)
    done: set[str] = set()
    adopted: set[str] = set()
    absorbed: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for commit, group in commits.items():
            if commit in done:
                continue
            closing = next((f for f in group if f.get("closing")), None)
            if commit in adopted or commit in absorbed or (closing is not None
                                                           and closing["closing"] == len(group)):
                done.add(commit)
                changed = True
                if closing is not None:
                    adopted |= set(closing.get("adopts", []))
                    for c, n in closing.get("absorbs", {}).items():
                        absorbed[c] = absorbed.get(c, 0) + int(n)
    complete, replaced, left_out = [], set(), []
    for commit, group in commits.items():
        if commit not in done:
            why = "its commit never finished (a writer stopped before its commit)"
            left_out += [{"path": f["key"], "reason": why} for f in group]
            continue
        complete.append(group)
        closing = next((f for f in group if f.get("closing")), None)
        if closing is not None:
            replaced |= set(closing.get("replaces", []))
    kept = sorted((f for group in complete for f in group if f["info"].path not in replaced),
                  key=lambda f: (f["info"].created_at or "", f["info"].path))
    left_out += [{"path": k, "reason": "replaced by a later commit"} for k in sorted(replaced)
                 if any(f["key"] == k for f in files)]
    return kept, left_out
