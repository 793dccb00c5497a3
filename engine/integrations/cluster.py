"""The Ray edge: connect to a cluster, run an actor pool over rows, run a TorchTrainer.

Stage code calls only these functions, so it runs unchanged on a local cluster, on a remote
cluster (`address="ray://…"` or `"auto"`), and as a `ray job submit` entrypoint.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from storage import DETERMINISTIC_THREADS

# Quiet, reproducible defaults for every Ray process we start (set before `import ray`).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_mb: int = 256) -> None:
    """Connect to Ray once per process.

    address: None or "local" starts a private local cluster (never joins a stale one);
    "auto" or "ray://host:port" joins an existing cluster (then resources are the cluster's).
    Inside a Ray job (RAY_ADDRESS set by `ray job submit`) a bare `ray.init()` is used.
    """
    if ray.is_initialized():
        return
    if address in (None, "", "local") and not os.environ.get("RAY_ADDRESS"):
        tmp = Path(tempfile.gettempdir()) / f"sa-ray-{os.getuid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=object_store_mb * 1024 * 1024, _temp_dir=str(tmp),
                 log_to_driver=False, configure_logging=False)
    elif address in (None, "", "local"):
        ray.init(log_to_driver=False)  # a job on an existing cluster: RAY_ADDRESS says where
    else:  # workers elsewhere get the thread runtimes' settings too (a local cluster inherits this process's)
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": dict(DETERMINISTIC_THREADS)})


def shutdown_ray() -> None:

    if ray.is_initialized():
        ray.shutdown()


def map_with_actor_pool(rows: list[dict], actor_cls: type, actor_args: tuple = (),
                        actor_kwargs: dict | None = None, num_actors: int = 1,
                        cpus_per_actor: float = 0.5, gpus_per_actor: float = 0.0,
                        batch_size: int = 1) -> Iterable[dict]:
    """Run `actor_cls(*actor_args, **actor_kwargs)(batch)` over `rows` on a Ray Data actor pool.

    The actor is built once per pool member (the model is loaded once). `batch` is a dict of
    numpy arrays (column -> array); the call returns the same kind of dict. Yields output rows
    as they are produced, so the caller can commit progress incrementally.
    cpus_per_actor stays <= 0.5 on small machines: actors holding every CPU starve Ray Data's
    own tasks (Ray issue #44687).
    """

    # The stage shows its own progress line; Ray Data's bars and per-operator INFO logs would bury it.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items(rows)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for restarts yet and warns about the catch-all one that carries them
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(actor_cls, fn_constructor_args=actor_args,
                            fn_constructor_kwargs=actor_kwargs or {},
                            compute=ray.data.ActorPoolStrategy(size=num_actors),
                            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
                            batch_size=batch_size, batch_format="numpy",
                            # chosen, not inherited: a node that dies takes its actors with it; the pool restarts
                            # them elsewhere and re-runs their batches (tests/test_multinode.py; docs/scaling.md)
                            max_restarts=-1, max_task_retries=-1)
    yield from ds.iter_rows()


def cpus_per_train_worker(num_workers: int) -> int:
    """The CPUs each Ray Train worker takes: the cluster's CPUs shared among the workers (training runs between
    the stages, when nothing else computes; one CPU per worker left a 2-core machine half idle)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, num_workers))


def fit_torch_trainer(train_loop: Callable[[dict], None], loop_config: dict, num_workers: int,
                      use_gpu: bool, storage_path: str | Path, name: str, cpus_per_worker: int = 1) -> Any:
    """Run `train_loop(loop_config)` on `num_workers` Ray Train workers (gloo on CPU, nccl on GPU), each
    holding `cpus_per_worker` CPUs.

    storage_path must be absolute (Ray Train rejects relative paths); returns the Ray Train
    `Result` (metrics, checkpoint).
    """
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=name),
    )
    return trainer.fit()
