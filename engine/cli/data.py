"""`sa-engine` commands on the data: export, import, the quarantine, the mask store's upkeep, gc."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from engine.cli import app, console, fail, quarantine_app, read_config, store_app, tagged


@app.command("export")
def export_cmd(fmt: str = typer.Option(..., "--format", help="sa1b (tars: one JSON per image beside the image), "
                                                            "coco (RLE), coco-polygons, yolo-seg, hf (Hugging Face "
                                                            "datasets) or webdataset (docs/exports.md)."),
               out: str = typer.Option(..., "--out", help="Output folder or s3://bucket/prefix."),
               config: Optional[Path] = typer.Option(None, "--config", help="Engine config: storage.root, "
                                                     "images.source, storage.s3_endpoint_url."),
               store: Optional[str] = typer.Option(None, "--store", help="The mask store (instead of storage.root)."),
               images: Optional[str] = typer.Option(None, "--images", help="The image source (instead of "
                                                    "images.source); every format but coco."),
               stage: Optional[list[str]] = typer.Option(None, "--stage", help="Only this stage (repeatable)."),
               rounds: Optional[str] = typer.Option(None, "--rounds", help="One round (2) or a range (1:3)."),
               verified_only: bool = typer.Option(False, "--verified-only", help="Only human-verified masks."),
               min_predicted_iou: Optional[float] = typer.Option(None, "--min-predicted-iou"),
               min_stability_score: Optional[float] = typer.Option(None, "--min-stability-score"),
               image_ids: Optional[Path] = typer.Option(None, "--image-ids", help="File: one image id a line."),
               split: Optional[str] = typer.Option(None, "--split", help="e.g. train=0.9,val=0.1 (stable hash "
                                                   "of the image id); default one split 'all'."),
               images_per_tar: Optional[int] = typer.Option(None, "--images-per-tar", help="sa1b / webdataset: "
                                                            "images per tar (1000); hf: images per file (500)."),
               tolerance_px: Optional[float] = typer.Option(None, "--tolerance-px", help="coco-polygons / yolo-seg: "
                                                            "polygon simplification in pixels (0.25)."),
               overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export."),
               s3_endpoint_url: Optional[str] = typer.Option(None, "--s3-endpoint-url")) -> None:
    """Export the masks in a trainer's format (SA-1B, COCO, YOLO, Hugging Face, WebDataset), filtered and split;
    prints a JSON summary."""
    from engine.integrations import runtime
    from engine.integrations.config import ConfigError, EngineConfig, load_config
    from storage.backend import StoreError
    from storage.exports import ExportError, ExportFilters, export, parse_rounds, parse_splits, read_image_ids

    def given(uri: Optional[str]) -> Optional[str]:  # a path on the command line is relative to here
        return uri if uri is None or "://" in uri else str(Path(uri).resolve())

    try:
        cfg = load_config(config) if config is not None else EngineConfig()
        if s3_endpoint_url:
            cfg.storage.s3_endpoint_url = s3_endpoint_url
        store_uri = given(store) or (cfg.path(cfg.storage.root) if config else None)
        images_uri = given(images) or (cfg.path(cfg.images.source) if config else None)
        if store_uri is None:
            fail("export: no mask store: pass --store URI or --config FILE")
        if fmt != "coco" and not fmt.startswith("coco-") and images_uri is None:
            fail(f"export --format {fmt}: no image source: pass --images URI or --config FILE")
        filters = ExportFilters(stage=tuple(stage) if stage else None, rounds=parse_rounds(rounds),
                                verified_only=verified_only, min_predicted_iou=min_predicted_iou,
                                min_stability_score=min_stability_score,
                                image_ids=read_image_ids(image_ids) if image_ids else None)
        source = runtime.image_source(cfg, images_uri) if images_uri else None
        summary = export(fmt, runtime.mask_store(cfg, store_uri), out, source, filters=filters,
                         splits=parse_splits(split), images_per_tar=images_per_tar, tolerance_px=tolerance_px,
                         overwrite=overwrite, **runtime.export_options(cfg))
    except (ConfigError, ExportError, StoreError) as e:
        fail(str(e), code=1)
    for skipped in summary.get("skipped", []):
        console.print(tagged("skipped", "yellow", f"{skipped['image_id']}: {skipped['reason']}"))
    console.print(f"{fmt} export: {summary['images']} images, {summary['masks']} masks -> {out}", highlight=False)
    sys.stdout.write(json.dumps(summary) + "\n")


@app.command("import")
def import_cmd(fmt: str = typer.Option(..., "--format", help="coco (RLE or polygons) or yolo-seg."),
               path: Path = typer.Argument(..., help="coco: the instances JSON; yolo-seg: the folder (data.yaml, "
                                                     "labels/)."),
               config: Path = typer.Option(..., "--config", help="The engine's YAML config: its store and images."),
               round_no: int = typer.Option(0, "--round", help="The round the imported masks belong to.")) -> None:
    """Bring earlier labels in as verified masks (origin "imported"): the labels' images must be in
    images.source; prints a JSON summary (a label whose image is not there is skipped with one line)."""
    from engine.integrations import runtime
    from engine.integrations.config import ConfigError, load_config
    from storage.backend import StoreError
    from storage.imports import import_coco, import_yolo

    if fmt not in ("coco", "yolo-seg"):
        fail(f"import --format {fmt}: expected coco or yolo-seg")
    try:
        cfg = load_config(config)
        store, source = runtime.mask_store(cfg), runtime.image_source(cfg)
        summary = (import_coco(store, source, path, round_no) if fmt == "coco"
                   else import_yolo(store, source, path, round_no))
    except (ConfigError, StoreError, ValueError, OSError) as e:
        fail(str(e).splitlines()[0], code=1)
    for skipped in summary["skipped"]:
        console.print(tagged("skipped", "yellow", f"{skipped['thing']}: {skipped['reason']}"))
    console.print(f"{fmt} import: {summary['masks']} masks on {summary['images']} images -> "
                  f"{cfg.path(cfg.storage.root)}", highlight=False)
    sys.stdout.write(json.dumps(summary) + "\n")


@quarantine_app.command("list")
def quarantine_list(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
                    stage: Optional[str] = typer.Option(None, help="Only this stage's entries.")) -> None:
    """What is set aside now: one line each (held: a rerun skips it; retrying: a rerun tries it again),
    then the entries as JSON."""
    from engine.integrations import runtime

    cfg = read_config(config)
    rows = [e for e in runtime.quarantine(cfg).status() if stage is None or e.get("stage") == stage]
    for e in rows:
        state = "held" if e["held"] else f"retrying ({e['attempts']}/{cfg.images.transient_retries})"
        console.print(f"{e['stage']:<6} {e['kind']:<9} {state:<14} {e['thing']}: {e['reason']}", highlight=False)
    console.print(f"{len(rows)} set aside ({sum(e['held'] for e in rows)} held)", highlight=False)
    sys.stdout.write(json.dumps(rows) + "\n")


@quarantine_app.command("release")
def quarantine_release(things: Optional[list[str]] = typer.Argument(None, help="The things to release, as "
                                                                           "`quarantine list` names them."),
                       config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
                       stage: Optional[str] = typer.Option(None, help="Only this stage's entries."),
                       release_all: bool = typer.Option(False, "--all", help="Release every entry (of --stage).")) -> None:
    """Let set-aside things through again: the next run of their stage tries them."""
    from engine.integrations import runtime

    if not things and not release_all:
        fail("quarantine release: name the things to release, or pass --all")
    cfg = read_config(config)
    released = runtime.quarantine(cfg).release(None if release_all else list(things), stage=stage)
    unknown = sorted(set(things or []) - {e["thing"] for e in released})
    for thing in unknown:
        console.print(tagged("not set aside:", "yellow", thing))
    console.print(f"released {len(released)}", highlight=False)
    sys.stdout.write(json.dumps(released) + "\n")
    if unknown:
        raise typer.Exit(1)


def _store_for(config: Optional[Path], store: Optional[str]):
    """(config, MaskStore) from --config or --store."""
    from engine.integrations import runtime
    from engine.integrations.config import EngineConfig

    cfg = read_config(config) if config is not None else EngineConfig()
    if store is None and config is None:
        fail("pass --config FILE or --store URI")
    uri = store if store is None or "://" in store else str(Path(store).resolve())
    return cfg, runtime.mask_store(cfg, uri)


@store_app.command("verify")
def store_verify(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                 store: Optional[str] = typer.Option(None, "--store", help="The mask store (instead of storage.root)."),
                 deep: bool = typer.Option(False, "--deep", help="Also decode every RLE and check its size, area and "
                                                                 "(with --config) its image's size."),
                 limit: int = typer.Option(100, help="Report at most this many bad rows.")) -> None:
    """Check every committed file against the manifest's checksums (and, --deep, every row). Exit 1 on a problem."""
    from engine.integrations import runtime
    from storage.backend import StoreError
    from storage.images import image_size

    cfg, mask_store = _store_for(config, store)
    try:
        if not deep:
            mask_store.verify()
            problems = []
        else:
            source = runtime.image_source(cfg) if config is not None else None
            problems = mask_store.verify_deep(
                None if source is None else (lambda image_id: image_size(source, image_id)), limit=limit)
    except StoreError as e:
        fail(str(e), code=1)
    for line in problems:
        console.print(tagged("bad row:", "red", line))
    manifest = mask_store.manifest()
    sys.stdout.write(json.dumps({"shards": len(manifest.shards), "rows": sum(x.rows for x in manifest.shards),
                                 "deep": deep, "problems": problems}) + "\n")
    if problems:
        raise typer.Exit(1)


@store_app.command("rebuild-manifest")
def store_rebuild_manifest(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                           store: Optional[str] = typer.Option(None, "--store", help="The mask store."),
                           dry_run: bool = typer.Option(False, "--dry-run", help="Say what it would do; write nothing.")) -> None:
    """Recover a lost or damaged manifest from the shard files on disk (finished commits only; the old
    manifest is kept beside as manifest.json.damaged-*)."""
    from storage.backend import StoreError

    _, mask_store = _store_for(config, store)
    try:
        summary = mask_store.rebuild_manifest(dry_run=dry_run)
    except StoreError as e:
        fail(str(e), code=1)
    for item in summary["left_out"]:
        console.print(tagged("left out", "yellow", f"{item['path']}: {item['reason']}"))
    console.print(f"manifest {'would list' if dry_run else 'rebuilt:'} {summary['shards']} shards, "
                  f"{summary['rows']} masks", highlight=False)
    sys.stdout.write(json.dumps(summary) + "\n")


@store_app.command("compact")
def store_compact(config: Optional[Path] = typer.Option(None, "--config", help="The engine's YAML config."),
                  store: Optional[str] = typer.Option(None, "--store", help="The mask store."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Say what it would do; write nothing.")) -> None:
    """Merge many small shards (under a quarter of storage.shard_target_mb) into few of about the target size,
    per stage, round and model; the masks, their ids and lineage are unchanged. Safe while stages run."""
    from storage.backend import StoreError

    _, mask_store = _store_for(config, store)
    try:
        summary = mask_store.compact(dry_run=dry_run)
    except StoreError as e:
        fail(str(e), code=1)
    console.print(f"{summary['shards_before']} shards -> {summary['shards_after']}"
                  f"{' (dry run)' if dry_run else ''}", highlight=False)
    sys.stdout.write(json.dumps(summary) + "\n")


@app.command("gc")
def gc_cmd(config: Path = typer.Option(..., "--config", help="The engine's YAML config."),
           export_out: Optional[list[str]] = typer.Option(None, "--export", help="Also clean what killed exports to "
                                                                              "this output left (repeatable)."),
           min_age_hours: float = typer.Option(1.0, "--min-age-hours", help="Leave younger files: they may belong "
                                                                            "to a writer that is still running.")) -> None:
    """Remove orphans: shard files no commit finished, half-written temporary files, staging folders of killed
    exports and checkpoint saves."""
    from engine.integrations import runtime
    from model.checkpoints import collect_checkpoint_garbage
    from storage.backend import StoreError
    from storage.exports import collect_export_garbage

    cfg = read_config(config)
    age = min_age_hours * 3600
    try:
        deleted = runtime.mask_store(cfg).collect_garbage(min_age_s=age)
    except StoreError as e:
        fail(str(e), code=1)
    for out in export_out or []:
        deleted += collect_export_garbage(out, min_age_s=age)
    deleted += collect_checkpoint_garbage(cfg.path("models"), min_age_s=age)
    for path in deleted:
        console.print(f"removed {path}", highlight=False)
    console.print(f"gc: removed {len(deleted)}", highlight=False)
    sys.stdout.write(json.dumps({"removed": deleted}) + "\n")
