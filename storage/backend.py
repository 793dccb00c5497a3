"""Where bytes live: a local folder or an S3 prefix, behind one small interface.

`open_store(uri)` gives a `Store` rooted at a local folder or at `s3://bucket/prefix`. Keys are
POSIX paths relative to the root ("shards/ab12.parquet"). Every write is atomic: a local write goes
to a temporary file in the same folder and is renamed into place; an S3 PUT (and a multipart
upload, which appears only when completed) is atomic by itself. So a reader sees the old object or
the new one, never half of one.

The manifest of a mask store is read-modify-written with `read_versioned` + `write_if_version`
(compare-and-swap): on S3 a conditional PUT (`If-Match` / `If-None-Match`), locally an exclusive
`flock` on a lock file around compare-and-rename.

S3 credentials come from boto3's standard chain (env, ~/.aws, instance role); the endpoint from
the argument, else `AWS_ENDPOINT_URL`, else AWS. Every error the user can act on is a `StoreError`
whose message is one line naming the object and the reason.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import contextlib
import errno
import hashlib
import io
import os
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

# Objects above this go up as a multipart upload (parts of this size), below it as a single PUT.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024


class StoreError(OSError):
    """An object could not be read or written; str(e) is one line: '<object>: <reason>'."""

    def __str__(self) -> str:  # OSError's default str would show an errno tuple
        return str(self.args[0]) if self.args else "storage error"


class ObjectNotFound(StoreError, FileNotFoundError):
    """The key (or the local file) does not exist."""


class BucketNotFound(StoreError):
    """The S3 bucket does not exist."""


class AccessDenied(StoreError, PermissionError):
    """The credentials (or file permissions) do not allow the operation."""


class ConflictError(StoreError):
    """A conditional write lost: the object changed since it was read."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in 4 MiB blocks (checkpoints, export files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{key!r}: not a valid store key (relative POSIX path without '..')")
    return key


class Store(ABC):
    """The interface both backends implement. `uri` is the root (a folder path or s3://bucket/prefix)."""

    uri: str

    @abstractmethod
    def url(self, key: str) -> str:
        """The full local path or s3:// URI of a key (for pandas, pyarrow, DuckDB)."""
        ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        ...

    @abstractmethod
    def write_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file (multipart on S3 when large)."""
        ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        ...

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A seekable binary file (S3: ranged GETs, so Parquet readers fetch only what they need)."""
        ...

    @abstractmethod
    def size(self, key: str) -> int:
        ...

    @abstractmethod
    def exists(self, key: str) -> bool:
        ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (relative to the root), sorted; temporary and hidden files left out."""
        ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key; a missing key is not an error."""
        ...

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Rename `src` to `dst` (replacing it); ObjectNotFound if `src` is absent. Local: one atomic rename; S3: a
        server-side copy, then the delete (the bytes never pass through this process)."""
        ...

    def remove_empty_folder(self, prefix: str, min_age_s: float = 0.0) -> bool:
        """Remove the folder `prefix` if it holds nothing and was last changed `min_age_s` ago or more; True if
        removed. Object stores have no folders: nothing to do."""
        return False

    @abstractmethod
    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(data, version) of a key, (None, None) if absent; pass the version to `write_if_version`."""
        ...

    @abstractmethod
    def write_if_version(self, key: str, data: bytes, version: str | None) -> None:
        """Write only if the key is still at `version` (None: only if it does not exist yet).
        Raises ConflictError otherwise."""
        ...


# ---------------------------------------------------------------- local folder


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def url(self, key: str) -> str:
        return str(self._path(key))

    def _write_error(self, path: Path, e: OSError) -> StoreError:
        if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
            return AccessDenied(f"{path}: cannot write (permission denied)")
        if e.errno == errno.EROFS:
            return AccessDenied(f"{path}: cannot write (read-only file system)")
        if e.errno == errno.ENOSPC:
            return StoreError(f"{path}: cannot write (no space left on device)")
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            return StoreError(f"{path}: cannot write (a parent path is a file, not a folder)")
        return StoreError(f"{path}: cannot write ({e.strerror or e})")

    def _atomic_write(self, path: Path, fill) -> None:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._write_error(path, e) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self._path(key), lambda f: f.write(data))

    def write_file(self, key: str, path: str | os.PathLike) -> None:
        def copy(f):
            with open(path, "rb") as src:
                while chunk := src.read(8 * 1024 * 1024):
                    f.write(chunk)

        self._atomic_write(self._path(key), copy)

    def _read_error(self, path: Path, e: OSError) -> StoreError:
        if isinstance(e, FileNotFoundError):
            return ObjectNotFound(f"{path}: not found")
        if isinstance(e, PermissionError):
            return AccessDenied(f"{path}: cannot read (permission denied)")
        if isinstance(e, IsADirectoryError):
            return StoreError(f"{path}: cannot read (is a folder)")
        return StoreError(f"{path}: cannot read ({e.strerror or e})")

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except OSError as e:
            raise self._read_error(path, e) from None

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except OSError as e:
            raise self._read_error(path, e) from None

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            return path.stat().st_size
        except OSError as e:
            raise self._read_error(path, e) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if not name.startswith("."):
                    keys.append((rel / name).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._write_error(path, e) from None

    def move(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        except FileNotFoundError:
            raise ObjectNotFound(f"{source}: not found") from None
        except OSError as e:
            raise self._write_error(target, e) from None

    def remove_empty_folder(self, prefix: str, min_age_s: float = 0.0) -> bool:
        path = self._path(prefix)
        try:
            if path == self.root or time.time() - path.stat().st_mtime < min_age_s:
                return False
            path.rmdir()  # fails on a folder that holds anything (a writer's file, a hidden temp file)
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        import fcntl  # POSIX only; the lock dies with its process, so a crash never leaves it held

        path = self._path(key)
        lock_path = path.parent / f".{path.name}.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise self._write_error(lock_path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            data = self.read_bytes(key)
        except ObjectNotFound:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def write_if_version(self, key: str, data: bytes, version: str | None) -> None:
        with self._lock(key):
            _, current = self.read_versioned(key)
            if current != version:
                raise ConflictError(f"{self._path(key)}: changed by another writer since it was read")
            self.write_bytes(key, data)


# ---------------------------------------------------------------- S3


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket name")
    return bucket, prefix.strip("/")


class S3Store(Store):
    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, multipart_chunk: int = MULTIPART_CHUNK):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self._client = None

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict:  # boto3 clients don't pickle (Ray ships stores to workers)
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            import boto3  # deferred: only S3 stores need it (~0.3 s to import)
            from botocore.config import Config

            config = Config(retries={"max_attempts": 4, "mode": "standard"},
                            s3={"addressing_style": "path"} if self.endpoint_url else {})
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        return self._client

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _error(self, e: Exception, key: str | None, action: str) -> StoreError:
        """botocore exceptions -> one-line StoreErrors naming the object."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = self.url(key) if key else f"s3://{self.bucket}/{self.prefix}"
        if isinstance(e, NoCredentialsError):
            return AccessDenied(f"{where}: cannot {action} (no AWS credentials found)")
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return BucketNotFound(f"{where}: cannot {action} (bucket {self.bucket!r} does not exist)")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{where}: not found")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "AllAccessDisabled") or status == 403:
                return AccessDenied(f"{where}: cannot {action} (access denied: {code})")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412):
                return ConflictError(f"{where}: changed by another writer since it was read")
            msg = str(err.get("Message") or code).replace("\n", " ")
            return StoreError(f"{where}: cannot {action} ({code}: {msg})")
        if isinstance(e, BotoCoreError):
            return StoreError(f"{where}: cannot {action} ({str(e).splitlines()[0]})")
        return StoreError(f"{where}: cannot {action} ({type(e).__name__}: {e})")

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunk, use_threads=True, max_concurrency=4)

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            if len(data) < self.multipart_threshold:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
            else:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key),
                                           Config=self._transfer_config())
        except Exception as e:
            raise self._error(_unwrap_transfer_error(e), key, "write") from None

    def write_file(self, key: str, path: str | os.PathLike) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer_config())
        except Exception as e:
            raise self._error(_unwrap_transfer_error(e), key, "write") from None

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as e:
            raise self._error(e, key, "read") from None

    def open_read(self, key: str) -> BinaryIO:
        return io.BufferedReader(_S3RangeReader(self, key), buffer_size=1024 * 1024)

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as e:
            raise self._error(e, key, "read") from None

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][strip:]
                    if rel and not any(p.startswith(".") for p in rel.split("/")) and not rel.endswith("/"):
                        keys.append(rel)
        except Exception as e:
            raise self._error(e, prefix or None, "list") from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            err = self._error(e, key, "delete")
            if not isinstance(err, ObjectNotFound):
                raise err from None

    def move(self, src: str, dst: str) -> None:
        try:
            self.client.copy_object(Bucket=self.bucket, Key=self._key(dst),
                                    CopySource={"Bucket": self.bucket, "Key": self._key(src)})
        except Exception as e:
            raise self._error(e, src, "move") from None
        self.delete(src)

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read(), obj["ETag"]
        except Exception as e:
            err = self._error(e, key, "read")
            if isinstance(err, ObjectNotFound):
                return None, None
            raise err from None

    def write_if_version(self, key: str, data: bytes, version: str | None) -> None:
        # S3 conditional writes (2024): If-None-Match '*' creates only; If-Match <etag> replaces only
        # that version. Either way the losing writer gets 412 and must re-read.
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except Exception as e:
            raise self._error(e, key, "write") from None


def _unwrap_transfer_error(e: Exception) -> Exception:
    """boto3's transfer manager wraps ClientErrors in S3UploadFailedError; find the original."""
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cause.__cause__ or cause.__context__
        from botocore.exceptions import ClientError

        if isinstance(nxt, ClientError):
            return nxt
        cause = nxt
    return e


class _S3RangeReader(io.RawIOBase):
    """A seekable read-only file over one S3 object, reading with ranged GETs."""

    def __init__(self, store: S3Store, key: str):
        self.store, self.key = store, key
        self.length = store.size(key)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        try:
            body = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store._key(self.key),
                                                Range=f"bytes={self.pos}-{self.pos + n - 1}")["Body"].read()
        except Exception as e:
            raise self.store._error(e, self.key, "read") from None
        buffer[: len(body)] = body
        self.pos += len(body)
        return len(body)


def open_store(uri: str, s3_endpoint_url: str | None = None, s3_region: str | None = None) -> Store:
    """A Store for a local folder (created on first write) or an `s3://bucket/prefix` URI."""
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url=s3_endpoint_url, region=s3_region)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: unsupported storage URI (use a local folder or s3://bucket/prefix)")
    return LocalStore(uri[len("file://"):] if uri.startswith("file://") else uri)
