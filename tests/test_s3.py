"""S3 integration against moto's S3 server on 127.0.0.1 (the `s3_server` fixture): real HTTP, real boto3."""
import json
import os
import urllib.request

import boto3
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.backend import AccessDenied, BucketNotFound, ConflictError, ObjectNotFound, S3Store, open_store
from storage.images import ImageSource
from storage.quarantine import Quarantine
from storage.shards import CorruptShardError, MaskStore
from tests.test_shards import fill, scene_records


def test_round_trip_list_range_reads(s3_bucket):
    store = open_store(f"{s3_bucket.uri}/root/prefix", s3_endpoint_url=s3_bucket.endpoint_url)
    assert isinstance(store, S3Store)
    store.write_bytes("b/two.bin", b"2")
    store.write_bytes("a.bin", b"hello world")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="root/prefix-other/x.bin", Body=b"not ours")
    assert store.list() == ["a.bin", "b/two.bin"]
    assert store.list("b") == ["b/two.bin"]
    assert store.read_bytes("a.bin") == b"hello world" and store.size("a.bin") == 11
    with store.open_read("a.bin") as f:
        f.seek(6)
        assert f.read(3) == b"wor" and f.read() == b"ld"
    assert store.url("a.bin") == f"{s3_bucket.uri}/root/prefix/a.bin"
    store.delete("a.bin")
    store.delete("a.bin")
    assert not store.exists("a.bin")
    with pytest.raises(ObjectNotFound, match=r"root/prefix/a\.bin: not found"):
        store.read_bytes("a.bin")


def test_large_objects_go_up_as_multipart(s3_bucket):
    store = S3Store(f"{s3_bucket.uri}/big", endpoint_url=s3_bucket.endpoint_url,
                    multipart_threshold=5 * 1024 * 1024, multipart_chunk=5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    store.write_bytes("blob.bin", data)
    etag = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="big/blob.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), "three parts"
    assert store.read_bytes("blob.bin") == data


def test_missing_bucket_is_a_one_line_error(s3_server):
    store = open_store("s3://no-such-bucket-xyz/prefix", s3_endpoint_url=s3_server)
    with pytest.raises(BucketNotFound) as e:
        store.write_bytes("manifest.json", b"{}")
    assert str(e.value) == ("s3://no-such-bucket-xyz/prefix/manifest.json: cannot write "
                            "(bucket 'no-such-bucket-xyz' does not exist)")
    with pytest.raises(BucketNotFound, match="does not exist"):
        MaskStore("s3://no-such-bucket-xyz/prefix", s3_endpoint_url=s3_server).shards()
    with pytest.raises(BucketNotFound):
        ImageSource("s3://no-such-bucket-xyz/imgs", s3_endpoint_url=s3_server).list()


def test_access_denied_is_a_one_line_error(s3_bucket, monkeypatch):
    # A user with no policy at all; then turn on moto's IAM enforcement for the rest of this test.
    iam = boto3.client("iam", endpoint_url=s3_bucket.endpoint_url, region_name="us-east-1")
    user = f"nobody-{s3_bucket.name}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])

    def set_auth(count: str) -> None:
        req = urllib.request.Request(f"{s3_bucket.endpoint_url}/moto-api/reset-auth", data=count.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req).read()

    set_auth("0")
    try:
        store = open_store(f"{s3_bucket.uri}/masks", s3_endpoint_url=s3_bucket.endpoint_url)
        with pytest.raises(AccessDenied) as e:
            store.write_bytes("manifest.json", b"{}")
        message = str(e.value)
        assert message.startswith(f"{s3_bucket.uri}/masks/manifest.json: cannot write (access denied")
        assert "\n" not in message
        with pytest.raises(AccessDenied, match="cannot read"):
            store.read_bytes("manifest.json")
    finally:
        set_auth("inf")


def test_conditional_writes(s3_bucket):
    store = open_store(s3_bucket.uri, s3_endpoint_url=s3_bucket.endpoint_url)
    store.write_if_version("m.json", b"1", None)
    with pytest.raises(ConflictError):
        store.write_if_version("m.json", b"x", None)
    data, etag = store.read_versioned("m.json")
    store.write_if_version("m.json", b"2", etag)
    with pytest.raises(ConflictError):
        store.write_if_version("m.json", b"3", etag)
    assert store.read_bytes("m.json") == b"2"


def test_mask_store_on_s3(s3_bucket):
    store = MaskStore(f"{s3_bucket.uri}/store", s3_endpoint_url=s3_bucket.endpoint_url, shard_target_mb=0.01)
    auto = fill(store, range(4), "auto", 0, "m1")
    manual = fill(store, range(4, 6), "manual", 1, "m2")
    assert store.read_table().num_rows == len(auto) + len(manual)
    assert store.read_table(stage="manual", verified=True).num_rows == len(manual)
    assert store.read_table(min_predicted_iou=0.6, columns=["mask_id"]).num_rows == sum(
        1 for r in auto + manual if np.float32(r.predicted_iou) >= np.float32(0.6))
    assert store.images_done("auto") == {f"img{i:03d}.png" for i in range(4)}
    store.verify()
    # upsert on S3: latest wins, replaced shard objects removed
    edited = [r for r in auto if r.image_id == "img001.png"][:1]
    from storage.records import MaskRecord

    store.upsert([MaskRecord(**{**edited[0].__dict__, "stage": "manual", "round": 1, "verified": True})],
                 "manual", 1, "m2")
    assert store.read_table().num_rows == len(auto) + len(manual)
    assert store.read_table(verified=True).num_rows == len(manual) + 1
    listed = {s.path for s in store.shards()}
    assert {k for k in store.store.list("shards")} == listed
    # the shard URIs open directly with pyarrow's own S3 client
    fs = pafs.S3FileSystem(endpoint_override=s3_bucket.endpoint_url, access_key="testing",
                           secret_key="testing", region="us-east-1", scheme="http")
    paths = [p[len("s3://"):] for p in store.shard_paths()]
    assert pq.ParquetDataset(paths, filesystem=fs).read().num_rows == len(auto) + len(manual)
    # a tampered shard is named
    victim = store.shards()[0]
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"store/{victim.path}", Body=b"x" * victim.bytes)
    with pytest.raises(CorruptShardError, match=victim.path):
        store.verify()


def test_losing_committer_rereads_and_retries_on_s3(s3_bucket, monkeypatch):
    a = MaskStore(f"{s3_bucket.uri}/s", s3_endpoint_url=s3_bucket.endpoint_url)
    b = MaskStore(f"{s3_bucket.uri}/s", s3_endpoint_url=s3_bucket.endpoint_url)
    fill(a, range(1), "auto", 0, "m")
    wa, wb = a.writer("auto", 0, "m"), b.writer("auto", 0, "m")
    wa.add(scene_records(1, "auto", 0, "m")[0])
    wb.add(scene_records(2, "auto", 0, "m")[0])
    real_read = b.store.read_versioned
    conflicts = []
    real_write = b.store.write_if_version

    def read_then_rival_commits(key):
        seen = real_read(key)
        if not conflicts:
            wa.commit()  # a commits between b's read and b's conditional write
        return seen

    def counting_write(key, data, version):
        try:
            real_write(key, data, version)
        except ConflictError:
            conflicts.append(key)
            raise

    monkeypatch.setattr(b.store, "read_versioned", read_then_rival_commits)
    monkeypatch.setattr(b.store, "write_if_version", counting_write)
    wb.commit()
    assert conflicts == ["manifest.json"], "b's first conditional PUT lost (412) and was retried"
    assert len(a.shards()) == 3 and {s.min_image_id for s in a.shards()} == {
        "img000.png", "img001.png", "img002.png"}
    assert json.loads(a.store.read_bytes("manifest.json"))["generation"] == 3


def test_images_and_quarantine_on_s3(s3_bucket, tmp_path):
    import io

    client = s3_bucket.client
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 20, 3), 7, np.uint8)).save(buf, "PNG")
    client.put_object(Bucket=s3_bucket.name, Key="imgs/x/good.png", Body=buf.getvalue())
    client.put_object(Bucket=s3_bucket.name, Key="imgs/bad.jpg", Body=b"")
    client.put_object(Bucket=s3_bucket.name, Key="imgs/readme.txt", Body=b"hi")
    src = ImageSource(f"{s3_bucket.uri}/imgs", s3_endpoint_url=s3_bucket.endpoint_url)
    refs = src.list()
    assert [(r.image_id, r.uri) for r in refs] == [("bad.jpg", f"{s3_bucket.uri}/imgs/bad.jpg"),
                                                  ("x/good.png", f"{s3_bucket.uri}/imgs/x/good.png")]
    quarantine = Quarantine(f"{s3_bucket.uri}/store", s3_endpoint_url=s3_bucket.endpoint_url)
    loaded = list(src.load_many(refs, quarantine, stage="auto"))
    assert [im.image_id for im in loaded] == ["x/good.png"] and loaded[0].pixels.shape == (10, 20, 3)
    assert [(e["thing"], e["reason"]) for e in quarantine.entries()] == [
        (f"{s3_bucket.uri}/imgs/bad.jpg", "empty file (0 bytes)")]
