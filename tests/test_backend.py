import threading

import pytest

from storage import backend
from storage.backend import AccessDenied, ConflictError, LocalStore, ObjectNotFound, StoreError, open_store


def test_local_round_trip_list_exists_delete(tmp_path):
    store = open_store(str(tmp_path / "root"))
    assert isinstance(store, LocalStore)
    store.write_bytes("b/two.bin", b"2")
    store.write_bytes("a.bin", b"one")
    store.write_bytes("b/c/three.bin", b"333")
    assert store.list() == ["a.bin", "b/c/three.bin", "b/two.bin"]
    assert store.list("b") == ["b/c/three.bin", "b/two.bin"]
    assert store.list("missing") == []
    assert store.read_bytes("a.bin") == b"one" and store.size("b/c/three.bin") == 3
    assert store.exists("a.bin") and not store.exists("nope.bin")
    with store.open_read("b/c/three.bin") as f:
        f.seek(1)
        assert f.read() == b"33"
    store.delete("a.bin")
    store.delete("a.bin")  # deleting what is gone is fine
    assert not store.exists("a.bin")
    assert store.url("b/two.bin") == str(tmp_path / "root" / "b" / "two.bin")


def test_missing_key_is_a_one_line_not_found(tmp_path):
    store = open_store(str(tmp_path))
    with pytest.raises(ObjectNotFound) as e:
        store.read_bytes("x/y.bin")
    assert str(e.value) == f"{tmp_path / 'x' / 'y.bin'}: not found"


def test_keys_cannot_escape_the_root(tmp_path):
    store = open_store(str(tmp_path))
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            store.write_bytes(bad, b"x")


def test_failed_write_keeps_old_content_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = open_store(str(tmp_path))
    store.write_bytes("k.bin", b"old")

    def crash(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(backend.os, "replace", crash)
    with pytest.raises(StoreError, match=r"k\.bin: cannot write \(Input/output error\)"):
        store.write_bytes("k.bin", b"new")
    monkeypatch.undo()
    assert store.read_bytes("k.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.bin"]


def test_unwritable_output_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("I am a file, not a folder")
    store = open_store(str(tmp_path / "file" / "store"))
    with pytest.raises(StoreError) as e:
        store.write_bytes("manifest.json", b"{}")
    message = str(e.value)
    assert "\n" not in message and "manifest.json" in message and "cannot write" in message


def test_permission_denied_maps_to_access_denied(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(AccessDenied, match="permission denied"):
            open_store(str(locked)).write_bytes("x.bin", b"1")
    finally:
        locked.chmod(0o700)


def test_list_skips_hidden_and_temporary_files(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes("a.bin", b"1")
    (tmp_path / ".a.bin.1234.tmp").write_bytes(b"partial")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x").write_bytes(b"x")
    assert store.list() == ["a.bin"]


def test_compare_and_swap(tmp_path):
    store = open_store(str(tmp_path))
    assert store.read_versioned("m.json") == (None, None)
    store.write_if_version("m.json", b"1", None)
    with pytest.raises(ConflictError, match="changed by another writer"):
        store.write_if_version("m.json", b"x", None)
    data, version = store.read_versioned("m.json")
    store.write_if_version("m.json", b"2", version)
    with pytest.raises(ConflictError):
        store.write_if_version("m.json", b"3", version)  # stale version
    assert store.read_bytes("m.json") == b"2"


def test_concurrent_compare_and_swap_loses_no_update(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes("counter", b"0")

    def bump(times: int) -> None:
        own = LocalStore(str(tmp_path))  # its own lock file descriptor, as another process would have
        for _ in range(times):
            while True:
                data, version = own.read_versioned("counter")
                try:
                    own.write_if_version("counter", str(int(data) + 1).encode(), version)
                    break
                except ConflictError:
                    continue

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read_bytes("counter") == b"100"


def test_unsupported_uri():
    with pytest.raises(ValueError, match="unsupported storage URI"):
        open_store("gs://bucket/x")
