"""Reading exports back: the index, a file checked against its sha256, SA-1B tars."""
from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from storage.backend import LocalStore, StoreError, open_store
from storage.exports.common import (
    INDEX_NAME,
    CorruptExportError,
    _sha256_file,
)

log = logging.getLogger("storage.exports")

# ----------------------------------------------------------------------------------------------------------
# Reading exports back


def _export_store(out: str, s3_endpoint_url: str | None, s3_region: str | None = None):

    return open_store(str(out).rstrip("/"), s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)


def read_index(out: str, s3_endpoint_url: str | None = None, s3_region: str | None = None) -> dict:
    """The index of a finished export; raises CorruptExportError when there is none (incomplete export)."""
    store = _export_store(out, s3_endpoint_url, s3_region)
    if not store.exists(INDEX_NAME):
        raise CorruptExportError(f"{out}: no {INDEX_NAME}: not an export, or an incomplete one")
    return json.loads(store.read_bytes(INDEX_NAME))


def open_export_file(out: str, entry: dict, s3_endpoint_url: str | None = None, verify: bool = True,
                     s3_region: str | None = None) -> BinaryIO:
    """A binary file of one file listed in an export's index, checked against its sha256 first.

    Streams in 1 MiB chunks (a local file is hashed in place; an S3 object is copied to a temporary
    file while hashed), so memory stays flat however large the file. Raises CorruptExportError naming it.
    """
    store = _export_store(out, s3_endpoint_url, s3_region)
    rel = entry["path"]
    where = store.url(rel)
    try:
        if isinstance(store, LocalStore):
            if verify and _sha256_file(Path(where)) != entry["sha256"]:
                raise CorruptExportError(f"{where}: checksum mismatch (sha256 differs from the index)")
            return open(where, "rb")
        tmp = tempfile.TemporaryFile()
        h = hashlib.sha256()
        with store.open_read(rel) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                tmp.write(chunk)
        tmp.seek(0)
        if verify and h.hexdigest() != entry["sha256"]:
            tmp.close()
            raise CorruptExportError(f"{where}: checksum mismatch (sha256 differs from the index)")
        return tmp
    except (StoreError, OSError) as e:
        raise CorruptExportError(f"{where}: listed in the index but unreadable ({e})".replace("\n", " ")) from None


def iter_sa1b_tar(fileobj: BinaryIO) -> Iterator[tuple[dict, str, bytes]]:
    """Yield (image JSON, image file name, image bytes) for each image of one SA-1B tar, streaming.

    Works on any SA-1B tar (Meta's or ours): members are paired by their stem (`sa_1.jpg` + `sa_1.json`).
    """
    pending: dict[str, dict] = {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            stem, _, ext = name.rpartition(".")
            data = tar.extractfile(member).read()
            slot = pending.setdefault(stem, {})
            if ext == "json":
                slot["json"] = json.loads(data)
            else:
                slot["image"] = (name, data)
            if "json" in slot and "image" in slot:
                del pending[stem]
                yield slot["json"], slot["image"][0], slot["image"][1]
    for stem, slot in pending.items():
        if "json" in slot:  # a JSON without its image (e.g. images stripped): still yield the masks
            yield slot["json"], slot["json"]["image"].get("file_name", stem), b""
