"""The config's checks beyond types: what a run needs from the outside world (folders, S3 buckets, Label Studio,
the Ray address) and the numbers that must agree with each other, one line per problem."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path


from engine.integrations.config import (SET_METRICS, SYSTEM_FOLDERS, PER_MASK_METRICS, ConfigError,  # noqa: F401
                                         EngineConfig)


def _local_problem(key: str, value: str | None, cfg: EngineConfig, want: str) -> str | None:
    """`key: reason` if the configured local path is not there as `want` ("dir" or "file")."""
    p = Path(cfg.path(value))
    if not p.exists():
        return f"{key}: {p}: not found"
    if want == "dir" and not p.is_dir():
        return f"{key}: {p}: not a folder"
    if want == "file" and not p.is_file():
        return f"{key}: {p}: not a file"
    return None


def _s3_problem(key: str, uri: str, cfg: EngineConfig) -> str | None:
    """`key: reason` if the bucket of `uri` can't be reached (short timeouts, no retries)."""
    import boto3  # deferred: only S3 URIs need it (~0.3 s to import)
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = uri[len("s3://"):].split("/", 1)[0]
    client = boto3.client("s3", endpoint_url=cfg.storage.s3_endpoint_url, region_name=cfg.storage.s3_region,
                          config=BotoConfig(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "?")
        reason = {"404": "bucket does not exist", "NoSuchBucket": "bucket does not exist",
                  "403": "access denied"}.get(code, f"error {code}")
        return f"{key}: {uri}: {reason}"
    except (BotoCoreError, OSError) as e:
        return f"{key}: {uri}: unreachable ({' '.join(str(e).split())})"
    return None


def _http_problem(key: str, url: str, timeout_s: float = 3.0) -> str | None:
    """`key: reason` if GET `url` does not answer 2xx within `timeout_s`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            if r.status >= 300:
                return f"{key}: {url}: answered HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"{key}: {url}: answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"{key}: {url}: unreachable ({' '.join(str(reason).split())})"
    return None


def _tcp_problem(key: str, shown: str, host: str, port: int, timeout_s: float = 3.0) -> str | None:

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"{key}: {shown}: unreachable ({e.strerror or e})"


def ray_address_problem(address: str, key: str = "ray.address") -> str | None:
    """`key: reason` if a Ray address can't be used: 'local' always can; 'auto' needs a cluster on
    this node (or RAY_ADDRESS); 'ray://host:port' (client, default port 10001) and 'host:port' (GCS)
    need the port to accept a connection."""
    if address in ("", "local"):
        return None
    if address == "auto":
        if os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists():
            return None
        return (f"{key}: 'auto' but no Ray cluster runs on this node "
                "(start one with `ray start --head`, or use 'local')")
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in hostport:
        return f"{key}: {address}: expected 'local', 'auto', 'ray://host:port' or 'host:port'"
    host, _, port = hostport.rpartition(":")
    if not host:
        host, port = hostport, "10001" if address.startswith("ray://") else "6379"
    if not port.isdigit():
        return f"{key}: {address}: port '{port}' is not a number"
    return _tcp_problem(key, address, host, int(port))


def check_config(cfg: EngineConfig, address: str | None = None, network: bool = True,
                 stage: str | None = None, simulate: bool | None = None) -> list[str]:
    """What a run needs beyond valid types, one `key: reason` line per problem (empty: all good).

    address: the Ray address the run will use (None: `ray.address`). network=False skips the
    reachability checks (S3 buckets, Label Studio, Ray) and keeps the local ones. stage: check for one
    stage command ("manual", "semi", "auto") instead of the round loop: no holdout is needed (promotion
    is the loop's), and Label Studio and ground truth only for the stages that use them; simulate
    overrides `stages.simulate` (the stage's --simulate/--people).
    """
    problems: list[str | None] = []
    simulate = cfg.stages.simulate if simulate is None else simulate
    if stage is None:
        rounds = cfg.stages.manual.rounds + cfg.stages.semi.rounds
    else:  # one stage: "rounds" below means "Label Studio and annotators are needed"
        rounds = 1 if stage in ("manual", "semi", "review") else 0
    loop = stage is None
    if stage == "concept" and not cfg.stages.concept.checkpoint:
        problems.append("stages.concept.checkpoint: not set (a transformers SAM 3 directory; docs/models.md)")
    elif stage == "concept" and not Path(cfg.path(cfg.stages.concept.checkpoint)).is_dir():
        problems.append(f"stages.concept.checkpoint: {cfg.stages.concept.checkpoint}: no such directory")

    def where(key: str, value: str | None, want: str) -> None:
        if value is None:
            return
        if value.startswith("s3://"):
            if network:
                problems.append(_s3_problem(key, value, cfg))
        elif "://" in value:
            problems.append(f"{key}: {value}: only local paths and s3:// URIs are supported")
        else:
            problems.append(_local_problem(key, value, cfg, want))

    # numbers: each key's range is checked when the file is read (Field bounds above); what is left
    # here relates keys to each other
    if cfg.model.bootstrap_minutes is not None and cfg.model.bootstrap_steps == 0:
        problems.append("model.bootstrap_minutes: set, but model.bootstrap_steps is 0 (no bootstrap): the budget is "
                        "model.bootstrap_steps (optimiser steps); minutes are only a guard now")
    if not cfg.eval.clicks or min(cfg.eval.clicks) < 1:
        problems.append(f"eval.clicks: needs one or more click counts >= 1, got {cfg.eval.clicks}")
    metric = cfg.eval.promote_metric
    weights = metric if isinstance(metric, dict) else {metric: 1.0}
    if not weights or any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        problems.append(f"eval.promote_metric: weights must be >= 0 and not all 0, got {metric}")
    for name in weights:
        if not name.startswith("miou@") and name not in PER_MASK_METRICS + SET_METRICS:
            problems.append(f"eval.promote_metric: {name!r} is not a holdout metric (miou@k, "
                            f"{', '.join(PER_MASK_METRICS + SET_METRICS)})")
        elif name.startswith("miou@") and (not name[5:].isdigit() or int(name[5:]) not in cfg.eval.clicks):
            problems.append(f"eval.promote_metric: {name!r} is not measured (eval.clicks is {cfg.eval.clicks})")
        elif isinstance(metric, dict) and not name.startswith("miou@") and name not in PER_MASK_METRICS:
            problems.append(f"eval.promote_metric: {name!r} can't be mixed (a mix takes per-mask metrics: "
                            f"miou@k, {', '.join(PER_MASK_METRICS)})")
    if loop and rounds > 0 and bool(cfg.images.general_holdout_source) != bool(cfg.images.general_holdout_ground_truth):
        problems.append("images.general_holdout_source: set it and images.general_holdout_ground_truth together")
    elif loop and rounds > 0 and cfg.images.general_holdout_source:
        where("images.general_holdout_source", cfg.images.general_holdout_source, "dir")
        where("images.general_holdout_ground_truth", cfg.images.general_holdout_ground_truth, "file")

    # where the data comes from and goes to
    if not cfg.images.source:
        problems.append("images.source: required (a local folder or s3://bucket/prefix)")
    else:
        where("images.source", cfg.images.source, "dir")
    if rounds > 0 and simulate and not cfg.images.ground_truth:
        problems.append("images.ground_truth: required when stages.simulate is true (simulated annotators)")
    carved = cfg.images.holdout_from_source > 0  # the holdout comes from the source: nothing else to point at
    if loop and not carved and (rounds > 0 or cfg.model.bootstrap_steps > 0):
        for key in ("holdout_source", "holdout_ground_truth"):
            if not getattr(cfg.images, key):
                problems.append(f"images.{key}: required: promotion between rounds is gated on the holdout "
                                "(or carve one out of your images: images.holdout_from_source: N)")
    if rounds > 0 and simulate:
        where("images.ground_truth", cfg.images.ground_truth, "file")
    if loop and not carved and (rounds > 0 or cfg.model.bootstrap_steps > 0):
        where("images.holdout_source", cfg.images.holdout_source, "dir")
        where("images.holdout_ground_truth", cfg.images.holdout_ground_truth, "file")
    if cfg.model.checkpoint:
        where("model.checkpoint", cfg.model.checkpoint, "any")
    if cfg.stages.auto.verifier and stage in (None, "auto"):
        where("stages.auto.verifier", cfg.stages.auto.verifier, "file")
    for key, value in (("workdir", cfg.workdir), ("storage.root", cfg.storage.root)):
        if "://" not in value:
            resolved = Path(cfg.path(value)).resolve()
            system = next((f for f in SYSTEM_FOLDERS if resolved == Path(f) or Path(f) in resolved.parents), None)
            if system:
                problems.append(f"{key}: {resolved}: inside {system}, a system folder, not a place for data")
    if cfg.storage.root.startswith("s3://"):
        if network:
            problems.append(_s3_problem("storage.root", cfg.storage.root, cfg))
    else:
        root = Path(cfg.path(cfg.storage.root))
        existing = next((p for p in [root, *root.parents] if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK):
            problems.append(f"storage.root: {root}: not writable ({existing} is read-only)")

    # services
    if rounds > 0 and not cfg.labelstudio.managed:
        token = os.environ.get("SA_ENGINE_LS_TOKEN") or cfg.labelstudio.token
        if not cfg.labelstudio.url:
            problems.append("labelstudio.url: required when labelstudio.managed is false")
        elif network:
            problems.append(_http_problem("labelstudio.url", cfg.labelstudio.url.rstrip("/") + "/health"))
        if not token:
            problems.append("labelstudio.token: required when labelstudio.managed is false "
                            "(or set SA_ENGINE_LS_TOKEN)")
    if network:
        problems.append(ray_address_problem(address if address is not None else cfg.ray.address,
                                            "--address" if address is not None else "ray.address"))
    return [p for p in problems if p]


def validate_for_run(cfg: EngineConfig, address: str | None = None, network: bool = True,
                     stage: str | None = None, simulate: bool | None = None) -> None:
    """Raise ConfigError listing every problem `check_config` finds (one line each)."""
    problems = check_config(cfg, address=address, network=network, stage=stage, simulate=simulate)
    if problems:
        raise ConfigError("\n".join(problems))
