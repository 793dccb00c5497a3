"""The stage kit: the one driver every Ray stage shares (automatic, concept, and any later one).

A Ray stage is: its images not yet done -> an actor pool (the model built once per actor) where each actor
writes its batch's masks as one staged part (`MaskStore.write_part`) and hands back only the part's
descriptor and a line per image -> the driver adopts parts, marks images done, sets failures aside and commits
every N images. This module holds that loop once, with one vocabulary, so the stages cannot drift apart:

- an image's line: {"image_id", "status", "reason", "kind", "masks", "seconds", "cpu_seconds", ...stage's own};
- status "ok"; "bad": the image cannot be used (unreadable, too large, missing); "failed": the model failed on
  it (at every scale); kind "transient" | "permanent" is how the quarantine holds it (`outcome_of`);
- a part for an image this run adopted already (Ray delivered a batch twice) is left out (gc removes it);
- an image set aside as transient and done in this run leaves the quarantine.

Stages import this (it sits on the integrations floor, below them); it knows no config: a stage's plan gives
it a `PoolPlan`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.integrations.cluster import init_ray, map_with_actor_pool
from model.segmenter import failure_kind
from storage.images import BadImage, ImageSource
from storage.quarantine import Quarantine
from storage.shards import MaskStore, ShardInfo

log = logging.getLogger("sa_engine.stage_kit")

OK, BAD, FAILED = "ok", "bad", "failed"


# --------------------------------------------------------------------------- actor side

def outcome_of(error: BaseException) -> tuple[str, str, str]:
    """(status, reason, kind) of an image an actor could not finish: "bad" for an image that cannot be used
    (storage/images.py BadImage: its own transient/permanent), "failed" for a model failure (transient only
    when it ran out of memory, model/segmenter.py failure_kind)."""
    if isinstance(error, BadImage):
        return BAD, str(error), error.kind
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return FAILED, f"model failed at every scale: {type(error).__name__}: {first}"[:300], failure_kind(error)


def part_row(store: MaskStore, records: list, stage: str, round: int, index_key: str,
             lines: list[dict]) -> dict[str, np.ndarray]:
    """What an actor hands back for a batch: its masks written here as one staged part (none when the batch
    made no mask) and one line per image. The driver commits the part (or gc removes it)."""
    part = ""
    if records:
        part = json.dumps(asdict(store.write_part(records, stage, round, index_key)), separators=(",", ":"))
    return {"part": np.array([part], dtype=object),
            "images": np.array([json.dumps(lines, separators=(",", ":"))], dtype=object)}


# --------------------------------------------------------------------------- driver side

@dataclass(frozen=True)
class PoolPlan:
    """How a stage runs on Ray. index_key: the image index's model_version ("done for what": the model, or the
    model and a phrase list)."""

    stage: str
    round: int
    index_key: str
    num_actors: int = 1
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    images_per_batch: int = 1
    images_per_commit: int = 16
    ray_address: str | None = "local"
    ray_num_cpus: int | None = None

    @property
    def threads(self) -> int:
        """torch threads per actor: its CPUs on a CPU actor, one beside a GPU."""
        return max(1, int(self.cpus_per_actor)) if self.gpus_per_actor == 0 else 1


@dataclass
class ImagesToDo:
    """The images of a run. todo: not done for the index key and not held by the quarantine; retrying: the
    quarantine URIs of todo images set aside as transient before (tried again now)."""

    wanted: list[str]
    todo: list[str]
    already_done: int
    set_aside: int
    retrying: set[str] = field(default_factory=set)


def images_to_do(store: MaskStore, quarantine: Quarantine, source: ImageSource, stage: str, index_key: str,
                 image_ids: list[str] | None) -> ImagesToDo:
    """Which of `image_ids` (default: every image of the source) this run does; warns about those held."""
    wanted = [r.image_id for r in source.list()] if image_ids is None else list(dict.fromkeys(image_ids))
    done = store.images_done(stage, index_key)
    held, retrying = quarantine.things(stage), quarantine.retrying(stage)
    uri = {i: source.ref(i).uri for i in wanted}
    todo = [i for i in wanted if i not in done and uri[i] not in held]
    plan = ImagesToDo(wanted=wanted, todo=todo, already_done=sum(i in done for i in wanted),
                      set_aside=sum(i not in done and uri[i] in held for i in wanted),
                      retrying={uri[i] for i in todo if uri[i] in retrying})
    if plan.set_aside:
        log.warning("%d image(s) held in the quarantine are skipped (`sa-engine quarantine list`, then "
                    "`release` to try them again)", plan.set_aside)
    return plan


def first_not_done(store: MaskStore, source: ImageSource, stages: tuple[str, ...], count: int) -> list[str]:
    """The first `count` images of the source (in id order) that none of `stages` has done: a round's default
    images when the round loop did not choose them."""
    done = set().union(*(store.images_done(stage) for stage in stages))
    return [r.image_id for r in source.list() if r.image_id not in done][:count]


@dataclass
class PoolResult:
    """What the driver saw. arrivals: (seconds since start, masks) per image line, in arrival order; ok_lines:
    the lines of the images done (the stage reads its own fields from them)."""

    images: int = 0
    masks: int = 0
    parts: int = 0
    commits: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    actor_s: float = 0.0
    actor_cpu_s: float = 0.0
    driver_bytes: int = 0
    arrivals: list = field(default_factory=list)
    ok_lines: list = field(default_factory=list)


def run_on_pool(pool: PoolPlan, images: ImagesToDo, rows: list[dict], actor_cls: type, actor_args: tuple,
                store: MaskStore, quarantine: Quarantine, source: ImageSource,
                show_progress: bool = False) -> PoolResult:
    """Run `actor_cls(*actor_args)` over `rows` (one per todo image) and commit what comes back: a part and its
    images' "done" rows land in the same commit, every `pool.images_per_commit` images; failures go to the
    quarantine; a retried image done now leaves it. Masks never pass through here."""
    init_ray(pool.ray_address, num_cpus=pool.ray_num_cpus)
    num_actors = max(1, min(pool.num_actors, len(rows)))
    results = map_with_actor_pool(rows, actor_cls, actor_args=actor_args, num_actors=num_actors,
                                  cpus_per_actor=pool.cpus_per_actor, gpus_per_actor=pool.gpus_per_actor,
                                  batch_size=pool.images_per_batch)
    out = _commit(pool, results, store, quarantine, source, len(rows), show_progress)
    # Images set aside as transient that are done now leave the quarantine
    if images.retrying:
        done_now = store.images_done(pool.stage, pool.index_key)
        quarantine.release([source.ref(i).uri for i in images.todo
                            if i in done_now and source.ref(i).uri in images.retrying], stage=pool.stage)
    return out


def _commit(pool: PoolPlan, results: Iterable[dict], store: MaskStore, quarantine: Quarantine,
            source: ImageSource, total: int, show_progress: bool) -> PoolResult:
    out = PoolResult()
    start, since_commit = time.perf_counter(), 0
    taken: set[str] = set()  # images whose part this run adopted
    with _Progress(pool.stage, total, show_progress) as progress, \
            store.writer(pool.stage, pool.round, pool.index_key) as writer:
        for row in results:
            out.driver_bytes += len(row["part"]) + len(row["images"])
            lines = json.loads(row["images"])
            ok = [ln for ln in lines if ln["status"] == OK]
            if any(ln["image_id"] in taken for ln in ok):  # delivered twice: the first copy counts
                log.warning("a part for %d image(s) done already in this run was left out (gc removes it)", len(ok))
                continue
            if row["part"]:
                writer.adopt(ShardInfo.from_json(json.loads(row["part"])))
                out.parts += 1
            for line in lines:
                n = 0
                if line["status"] == OK:
                    n = int(line["masks"])
                    writer.image_done(line["image_id"], n)
                    taken.add(line["image_id"])
                    out.ok_lines.append(line)
                    out.images, out.masks = out.images + 1, out.masks + n
                else:
                    quarantine.add(source.ref(line["image_id"]).uri, line["reason"], pool.stage,
                                   line["kind"] or "permanent")
                    out.quarantined += 1
                out.arrivals.append((time.perf_counter() - start, n))
                out.actor_s += float(line.get("seconds", 0.0))
                out.actor_cpu_s += float(line.get("cpu_seconds", line.get("seconds", 0.0)))
                since_commit += 1
                progress.advance(out.images, out.masks, time.perf_counter() - start)
            if since_commit >= pool.images_per_commit:
                writer.commit()
                out.commits += 1
                since_commit = 0
        if since_commit:
            writer.commit()
            out.commits += 1
    out.seconds = time.perf_counter() - start
    return out


def steady_rates(arrivals: list[tuple[float, int]], num_actors: int) -> dict:
    """Throughput with actor start-up left out.

    arrivals: (seconds since the pool was asked for results, masks) per result, in arrival order.
    Each actor's first result pays its start-up; after the `num_actors`-th result every actor is
    warm, so the rate is taken from there to the last result: (n - k) results in (t_n - t_k).
    """
    out = dict(first_result_s=round_(arrivals[0][0]) if arrivals else 0.0,
               steady_images_per_s=0.0, steady_masks_per_s=0.0)
    k = num_actors
    if len(arrivals) > k and arrivals[-1][0] > arrivals[k - 1][0]:
        window = arrivals[-1][0] - arrivals[k - 1][0]
        out["steady_images_per_s"] = round_((len(arrivals) - k) / window)
        out["steady_masks_per_s"] = round_(sum(m for _, m in arrivals[k:]) / window)
    return out


def round_(x: float) -> float:
    """Four significant digits, for summaries."""
    return float(f"{x:.4g}")


class _Progress:
    """A rich progress line: images done / total, images/s, masks/image (stderr; silent if disabled)."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total = label, total
        self.enabled = enabled and os.environ.get("SA_ENGINE_NO_PROGRESS") != "1"
        self.bar = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[rate]}"), console=Console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, rate="")
        return self

    def advance(self, images: int, masks: int, seconds: float) -> None:
        if self.bar is not None:
            rate = f"{images / max(seconds, 1e-9):.2f} images/s, {masks / max(images, 1):.1f} masks/image"
            self.bar.update(self.task, advance=1, rate=rate)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

