"""Session-wide fixtures: one local Ray cluster, one S3 API server on loopback, one Label Studio server.

Each is started at most once per test run and only when a test asks for it.
"""
from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster (2 CPUs, small object store) shared by the whole run."""
    import ray

    from engine.cluster import init_ray

    init_ray("local", num_cpus=2, object_store_mb=256)
    yield ray
    ray.shutdown()
