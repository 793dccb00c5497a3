"""One runtime built from the config: every storage and image setting reaches every store and image source,
and nothing else in the engine builds them (so no copy can drift again)."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from engine.integrations import runtime
from engine.integrations.config import AutoStageConfig, load_config
from model.amg_params import AmgParams

ROOT = Path(__file__).resolve().parents[1]
S3 = {"storage.root": "s3://bucket/store", "storage.s3_endpoint_url": "http://127.0.0.1:9",
      "storage.s3_region": "eu-north-1", "storage.shard_target_mb": 7.0, "images.source": "s3://bucket/images",
      "images.max_side": 640, "images.large_images": "quarantine"}


def test_every_store_and_image_source_gets_every_setting(tmp_path):
    cfg = load_config(None, {"workdir": str(tmp_path), **S3})
    stores = {"mask store": runtime.mask_store(cfg).store, "quarantine": runtime.quarantine(cfg).store,
              "image source": runtime.image_source(cfg).store,
              "holdout source": runtime.image_source(cfg, "s3://bucket/holdout").store,
              "other store": runtime.mask_store(cfg, "s3://bucket/bootstrap").store}
    for name, store in stores.items():
        assert (store.endpoint_url, store.region) == ("http://127.0.0.1:9", "eu-north-1"), name
    assert runtime.mask_store(cfg).shard_target_bytes == 7 * 1024 * 1024
    for source in (runtime.image_source(cfg), runtime.image_source(cfg, "s3://bucket/holdout")):
        assert (source.max_side, source.large_images) == (640, "quarantine")
    assert runtime.image_source(cfg, "relative/images").uri == str(tmp_path / "relative" / "images")


def test_an_s3_export_target_gets_the_endpoint_and_the_region(tmp_path):
    """The export's target and its readers open S3 as the run's stores do (the region never reached an export)."""
    import inspect

    from storage import exports
    from storage.exports.read import _export_store

    cfg = load_config(None, {"workdir": str(tmp_path), **S3})
    options = runtime.export_options(cfg)
    for opened in (exports._S3Target("s3://bucket/export", **options).store,
                   _export_store("s3://bucket/export", **options)):
        assert (opened.endpoint_url, opened.region) == ("http://127.0.0.1:9", "eu-north-1")
    for entry in (exports.export_sa1b, exports.export_coco, exports.read_index, exports.open_export_file):
        assert set(options) <= set(inspect.signature(entry).parameters), entry.__name__


# Where a store or image source may be built from a URI: the runtime, and in storage/ the classes' own homes and
# the user-facing readers that take a URI (datasets, export targets). Benchmarks measure storage on local scratch
# folders they make themselves and are not the engine.
BUILDERS = {"engine/integrations/runtime.py", "storage/backend.py", "storage/shards.py", "storage/images.py",
            "storage/quarantine.py", "storage/datasets.py", "storage/exports/targets.py", "storage/exports/read.py"}


def test_nothing_outside_the_runtime_builds_stores_or_image_sources():
    """Stages, the retraining step, the CLI and the report ask the runtime; in every package (engine, stages,
    model, storage, docker) only the runtime and the classes' own homes call these constructors."""
    pattern = re.compile(r"\b(MaskStore|ImageSource|Quarantine|open_store)\(")
    found = []
    for pkg in ("engine", "stages", "model", "storage", "docker"):
        for path in (ROOT / pkg).rglob("*.py"):
            if str(path.relative_to(ROOT)) in BUILDERS:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith(("#", "class ")):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []


def test_generator_parameters_come_from_the_config_field_by_field():
    """Every AmgParams field is either set from `stages.auto` (same name, same default) or one of the
    generator's internals; changing a config value changes the generator's value."""
    internal = {"stability_prefilter_margin", "mask_threshold", "edge_tolerance_px"}
    config_keys = set(AutoStageConfig.model_fields)
    defaults = AmgParams()
    for f in fields(AmgParams):
        if f.name in internal:
            assert f.name not in config_keys, f.name
            continue
        assert f.name in config_keys, f"{f.name}: not in stages.auto"
        assert AutoStageConfig.model_fields[f.name].default == getattr(defaults, f.name), f.name
        value = getattr(defaults, f.name)
        changed = (not value) if isinstance(value, bool) else value + 1 if isinstance(value, int) else value / 2
        section = AutoStageConfig(**{f.name: changed})
        assert getattr(runtime.amg_params(section), f.name) == changed, f.name


@pytest.mark.parametrize("device", ["cpu"])
def test_segmenter_from_config_is_seeded_and_on_the_device(tmp_path, device):
    cfg = load_config(None, {"workdir": str(tmp_path), "model.device": device, "seed": 3})
    a, b = runtime.segmenter(cfg, None), runtime.segmenter(cfg, None)
    assert a.model_version == b.model_version  # the same fresh model wherever it is built (driver, actors)
    assert runtime.checkpoint_path(cfg, "models/r1") == str(tmp_path / "models" / "r1")
