"""Session-wide fixtures: one local Ray cluster, one S3 API server on loopback, one Label Studio server.

Each is started at most once per test run and only when a test asks for it.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import storage  # noqa: E402,F401  (before any test module imports torch: the thread runtimes' settings)


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster (2 CPUs, small object store) shared by the whole run."""
    import ray

    from engine.integrations.cluster import init_ray

    init_ray("local", num_cpus=2, object_store_mb=256)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- S3: moto's server on loopback (storage)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on 127.0.0.1 (a free port), with dummy credentials; yields the endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
            mp.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server: an object with .name, .uri (s3://name), .endpoint_url, .client."""
    import uuid
    from types import SimpleNamespace

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield SimpleNamespace(name=name, uri=f"s3://{name}", endpoint_url=s3_server, client=client)



@pytest.fixture(scope="session")
def labelstudio_server(tmp_path_factory):
    """One real Label Studio server for the whole run (installed into its own venv on first use, cached
    under $SA_ENGINE_HOME), on a free loopback port, serving local files under pytest's base temp dir
    (so every tmp_path is servable). Stopped by PID at the end."""
    from engine.integrations.labelstudio import LabelStudio, ServerSettings, free_port, start_server, stop_server

    base = tmp_path_factory.getbasetemp()
    data_dir = base / "labelstudio-server"
    info = start_server(ServerSettings(data_dir=data_dir, port=free_port(), document_root=base),
                        wait_s=300, log=lambda m: print(m))
    info.document_root = str(base)
    info.client = LabelStudio(info.url, info.token)
    yield info
    stop_server(data_dir)


# ---------------------------------------------------------------- a model that has learned something (model)


@pytest.fixture(scope="session")
def fitted_compact():
    """A compact model fitted for 120 steps (~35 s) on four busy 128 px synthetic scenes, and those scenes
    (image, masks, boxes): enough to make hundreds of automatic masks and to tell a learner from a non-learner."""
    import torch

    from engine.integrations.synth import make_scene, scene_rng
    from model.segmenter import Segmenter
    from model.train import TrainSettings, dataset_sampler, train

    torch.set_num_threads(1)
    scenes = [make_scene(scene_rng(11, i), 128) for i in (1, 5, 7, 9)]
    seg = Segmenter.new("compact", seed=0)
    train(seg, dataset_sampler([s[0] for s in scenes], [s[1] for s in scenes]),
          TrainSettings(max_steps=120, minutes=10, batch_images=4, masks_per_image=4, crop_share=0.0, threads=1))
    return seg, scenes


# ---------------------------------------------------------------- order: the longest tests start first


def pytest_collection_modifyitems(config, items):
    """The tests marked slow run first, the people path (the longest, minutes) first of all: with two
    pytest-xdist workers the short tests then fill in beside them instead of leaving one long test running alone
    at the end. The order of everything else is kept."""
    def rank(item) -> int:
        if "test_people_path" in item.nodeid:
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)
