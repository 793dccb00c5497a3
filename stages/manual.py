"""The assisted-manual stage: annotators in Label Studio, our model answering their clicks.

`run_manual_stage` reads as the paper's stage 1, one named step each:
  1. Plan: the round's images (given, or the first `images_per_round` no manual round has done).
  2. Publish: the round's Label Studio project, its images as tasks, their embeddings precomputed.
  3. Annotate or wait: our ML backend answers clicks while simulated annotators label every task through the
     real API, or people do (the stage waits; Ctrl-C pulls what is there).
  4. Pull with lineage: every submitted region becomes a verified mask (stage=manual, round, annotator, lead
     time, clicks, Label Studio ids) in the shard store.
  5. Summarise: images, masks, clicks and seconds per mask; with gold tasks, each annotator's IoU on them.

Gold tasks (`stages.manual.gold_share`): that share of a round's tasks are holdout images with known masks, mixed
in among the others (annotators can't tell them apart). What is drawn on them is scored against the known masks,
per annotator, and never stored (the holdout is never trained on).

Pulling is idempotent: a mask's id is derived from (project, task, annotation, region), a mask whose RLE is
already stored is not written again, an edited annotation replaces the older version (the store's upsert keeps
the history). Bad regions (empty, wrong size, corrupt RLE) go to the quarantine. Everything is read from Label
Studio before anything is written, so an unreachable server leaves nothing half-written.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from engine.integrations import agreement, labelling, runtime
from engine.integrations.annotator import SimulatedAnnotator, effort_summary
from engine.integrations.config import EngineConfig
from engine.integrations.labelling import at_full_size, region_effort
from engine.integrations.labelstudio import LabelStudio, PullResult
from engine.integrations.ml_backend import precompute_embeddings
from engine.integrations.stage_kit import first_not_done
from model.iou import pairwise_mask_iou
from storage.coco import GTObject, load_ground_truth
from storage.images import ImageSource
from storage.rle import decode_rles
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_masks

STAGE = "manual"
GOLD_PREFIX = "gold:"  # a gold task's image id: the holdout image's id behind it


@dataclass
class ManualSummary:
    """What one manual round did. pull: counts of the pull (pulled, written, updated, unchanged, problems,
    missing_tasks, images); embeddings: the backend's cache (hits, misses, precomputed, precomputed_now);
    simulated: the simulated annotators' effort (None with people)."""

    round: int
    images: int
    masks: int
    masks_per_image: float | None
    clicks_per_mask: float | None
    seconds_per_mask: float | None
    ls_project_id: int
    ls_url: str
    model_version: str
    pull: dict
    embeddings: dict
    simulated: dict | None
    wall_s: float
    gold: dict | None = None  # {"images", "by_annotator": {annotator: {masks, iou, recall_50}}}; None: no gold
    agreement: dict | None = None  # {"tasks", "pairs": [(annotator, annotator, agreement)]}; None: no double task
    stage: str = STAGE

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- pull-back


def records_from_pull(pull: PullResult, project_id: int, round: int, model_version: str | None,
                      full_sizes: dict[str, tuple[int, int]] | None = None) -> list[MaskRecord]:
    """One verified MaskRecord per pulled region (COCO RLE), lineage in `source`. full_sizes: image id -> the
    file's (H, W) where the task showed a downscaled copy: those masks are stored at the file's size."""
    out = []
    for ann in pull.annotations:
        if not ann.regions:
            continue
        size = (full_sizes or {}).get(ann.image_id, (ann.height, ann.width))
        masks = np.stack([at_full_size(r.mask, size) for r in ann.regions])
        for r, rle in zip(ann.regions, encode_masks(masks)):
            clicks, seconds = region_effort(ann, r)
            out.append(MaskRecord.from_rle(
                ann.image_id, make_mask_id(ann.image_id, "ls", project_id, ann.task_id, ann.annotation_id, r.region_id),
                rle, STAGE, round, model_version=model_version, origin="manual",
                annotator=ann.annotator, verified=True,
                source={"ls_project": project_id, "ls_task": ann.task_id, "ls_annotation": ann.annotation_id,
                        "ls_region": r.region_id, "ls_updated_at": ann.updated_at,
                        "ls_prediction": r.prediction_id, **({"unsure": True} if r.unsure else {})},
                clicks=clicks, lead_time_s=seconds))
    return out


def pull_to_store(ls: LabelStudio, project_id: int, store, round: int, model_version: str | None,
                  quarantine=None, expected_tasks: dict[str, int] | None = None,
                  full_sizes: dict[str, tuple[int, int]] | None = None) -> dict:
    """Pull the project's annotations into the store (masks at their files' sizes, see records_from_pull).
    Returns counts: pulled, written (new + updated), unchanged, problems, missing_tasks, images."""
    pull = ls.pull(project_id)  # everything is read before anything is written
    records = records_from_pull(pull, project_id, round, model_version, full_sizes)
    gold = [r for r in records if r.image_id.startswith(GOLD_PREFIX)]  # scored by the stage, never stored
    records = [r for r in records if not r.image_id.startswith(GOLD_PREFIX)]
    # A task two people drew: the first annotation is stored, the later ones measure agreement
    first = {}
    for r in records:
        task, ann = r.source["ls_task"], r.source["ls_annotation"]
        first[task] = min(first.get(task, ann), ann)
    second = [r for r in records if r.source["ls_annotation"] != first[r.source["ls_task"]]]
    records = [r for r in records if r.source["ls_annotation"] == first[r.source["ls_task"]]]
    problems = list(pull.problems)
    present = set(pull.task_ids)
    missing = sorted(tid for tid in (expected_tasks or {}).values() if tid not in present)
    problems += [(f"task {tid}", "deleted in Label Studio before the pull") for tid in missing]
    existing = {}
    if records and store.shards():
        table = store.read_table(columns=["mask_id", "rle"], stage=STAGE,
                                 image_ids=sorted({r.image_id for r in records}))
        existing = dict(zip(table.column("mask_id").to_pylist(), table.column("rle").to_pylist()))
    todo = [r for r in records if existing.get(r.mask_id) != r.to_row()["rle"]]
    if todo:
        store.upsert(todo, stage=STAGE, round=round, model_version=model_version)
    done_images = {}
    for r in records:
        done_images[r.image_id] = done_images.get(r.image_id, 0) + 1
    new_images = sorted(i for i in done_images if i in {r.image_id for r in todo})
    if new_images:
        with store.writer(stage=STAGE, round=round, model_version=model_version) as w:
            for image_id in new_images:
                w.image_done(image_id, done_images[image_id])
            w.commit()
    if quarantine is not None:
        for thing, reason in problems:
            quarantine.add(f"labelstudio project {project_id} {thing}", reason, STAGE)
    return {"pulled": len(records), "written": len(todo), "updated": sum(r.mask_id in existing for r in todo),
            "unchanged": len(records) - len(todo), "problems": len(problems), "missing_tasks": len(missing),
            "images": len(done_images), "gold_records": gold, "agreement_pairs": agreement_pairs(records, second)}


def agreement_pairs(first: list[MaskRecord], second: list[MaskRecord]) -> list[tuple[str, str, float]]:
    """(first annotator, other annotator, agreement) for each task with a later annotation by someone else."""
    out = []
    for task in sorted({r.source["ls_task"] for r in second}):
        mine = [r for r in first if r.source["ls_task"] == task]
        for ann in sorted({r.source["ls_annotation"] for r in second if r.source["ls_task"] == task}):
            theirs = [r for r in second if r.source["ls_annotation"] == ann]
            a, b = (mine[0].annotator if mine else None), theirs[0].annotator
            if not mine or a == b:
                continue  # the same person twice is not agreement
            out.append((a or "?", b or "?", round_(agreement.pair_agreement(
                decode_rles([r.rle for r in mine]).astype(bool), decode_rles([r.rle for r in theirs]).astype(bool)))))
    return out


# --------------------------------------------------------------------------- gold tasks


@dataclass
class GoldPlan:
    """The round's gold tasks: holdout image ids, where they are read from, and their known masks."""

    image_ids: list[str]
    source: ImageSource
    truth: dict[str, list[GTObject]]


def plan_gold(cfg: EngineConfig, round: int) -> GoldPlan | None:
    """`gold_share` of the round's images, drawn (seeded by the round) from the holdout's images that have known
    masks; None without a share or a holdout."""
    share, holdout = cfg.stages.manual.gold_share, cfg.images
    if share <= 0 or not holdout.holdout_source or not holdout.holdout_ground_truth:
        return None
    source = runtime.image_source(cfg, cfg.path(holdout.holdout_source))
    ids = [r.image_id for r in source.list()]
    truth = load_ground_truth(cfg.path(holdout.holdout_ground_truth), image_ids=ids)
    ids = [i for i in ids if any(o.parent_id is None for o in truth.get(i, []))]
    if not ids:
        return None
    n = min(len(ids), max(1, int(np.ceil(cfg.stages.manual.images_per_round * share))))
    chosen = sorted(np.random.default_rng(cfg.seed * 7919 + round).choice(ids, size=n, replace=False).tolist())
    return GoldPlan(chosen, source, {i: [o for o in truth[i] if o.parent_id is None] for i in chosen})


def mixed_in(images: list, gold: list) -> list:
    """The gold tasks spread evenly among the others (not all at the end, where they would stand out)."""
    out, step = list(images), (len(images) + len(gold)) / max(len(gold), 1)
    for k, g in enumerate(gold):
        out.insert(min(len(out), int(k * step + step / 2)), g)
    return out


def score_gold(records: list[MaskRecord], gold: GoldPlan) -> dict:
    """Per annotator: masks drawn on gold tasks, their mean IoU to the known object each overlaps most, and the
    share of known objects on the gold images they drew at IoU >= 0.5 (recall)."""
    by_annotator: dict[str, dict] = {}
    for who in sorted({r.annotator or "?" for r in records}):
        mine = [r for r in records if (r.annotator or "?") == who]
        ious, found, objects = [], 0, 0
        for image_id in sorted({r.image_id for r in mine}):
            truth = np.stack([o.mask for o in gold.truth[image_id.removeprefix(GOLD_PREFIX)]])
            drawn = decode_rles([r.rle for r in mine if r.image_id == image_id]).astype(bool)
            if drawn.shape[1:] != truth.shape[1:]:
                continue  # drawn on another size than the known masks: not comparable
            iou = pairwise_mask_iou(drawn, truth)
            ious += iou.max(axis=1).tolist()
            found, objects = found + int((iou.max(axis=0) >= 0.5).sum()), objects + len(truth)
        by_annotator[who] = {"masks": len(mine), "iou": round_(np.mean(ious)) if ious else None,
                             "recall_50": round_(found / objects) if objects else None}
    return {"images": len(gold.image_ids), "by_annotator": by_annotator}


# --------------------------------------------------------------------------- the stage


class PeopleAnnotate:
    """People annotate in Label Studio: the stage waits until every task has an annotation (Ctrl-C pulls what is
    there)."""

    simulated = False

    def __init__(self, poll_s: float = 30.0):
        self.poll_s = poll_s

    def annotate(self, ls: LabelStudio, cfg: EngineConfig, project_id: int, tasks: dict, images: list,
                 backend_id: int | None, server) -> list:
        labelling.wait_for_people(ls, {project_id: len(tasks)}, self.poll_s,
                                  f"Label Studio project {project_id} at {ls.url}/projects/{project_id}: "
                                  "waiting for annotations (Ctrl-C to pull now)", labelling.login_line(cfg, server))
        return []


class SimulatedAnnotate:
    """A simulated annotator clicks every task through the real Label Studio API and the ML backend, knowing the
    truth. every_object: a holdout's annotator, who draws every object with no per-image time limit."""

    simulated = True

    def __init__(self, truth: dict, every_object: bool = False):
        self.truth, self.every_object = truth, every_object

    def annotate(self, ls: LabelStudio, cfg: EngineConfig, project_id: int, tasks: dict, images: list,
                 backend_id: int | None, server) -> list:
        settings = runtime.annotator_settings(cfg, every_object=self.every_object)
        annotator = SimulatedAnnotator(ls, backend_id, settings=settings)
        annotated = ls.annotated_task_ids(project_id)
        efforts = [annotator.annotate_image(tasks[im.image_id], im, self.truth.get(im.image_id, []))
                   for im in images if tasks[im.image_id] not in annotated]  # else a resumed round: submitted before
        double = ls.double_task_ids(project_id) - annotated
        if double:  # a second, hastier person draws the tasks Label Studio wants two annotations on
            second = SimulatedAnnotator(ls, backend_id, name="sim-annotator-2",
                                        settings=replace(settings, iou_target=max(0.5, settings.iou_target - 0.15)))
            efforts += [second.annotate_image(tasks[im.image_id], im, self.truth.get(im.image_id, []))
                        for im in images if tasks[im.image_id] in double]
        return efforts


def run_manual_stage(cfg: EngineConfig, round: int, checkpoint: str | None, image_ids: list[str] | None = None,
                     simulate: bool = True, poll_s: float = 30.0, purpose: str = STAGE,
                     annotators: "PeopleAnnotate | SimulatedAnnotate | None" = None) -> ManualSummary:
    """One assisted-manual round (steps: module doc). image_ids None: the first `images_per_round` images no
    manual round has done. annotators: who does step 3 (default: a simulated annotator when `simulate`, else
    people, polled every poll_s). purpose: "manual", or "holdout" (people draw the round loop's holdout; a
    simulated annotator then draws every object, with no time limit)."""
    t0 = time.monotonic()
    store, quarantine, source = runtime.mask_store(cfg), runtime.quarantine(cfg), runtime.image_source(cfg)
    annotators = annotators or (SimulatedAnnotate(runtime.ground_truth(cfg), every_object=purpose == "holdout")
                                if simulate else PeopleAnnotate(poll_s))

    # 1. Plan
    image_ids = image_ids if image_ids is not None else first_not_done(store, source, (STAGE,),
                                                                       cfg.stages.manual.images_per_round)
    segmenter = runtime.segmenter(cfg, checkpoint)

    gold = plan_gold(cfg, round) if purpose == STAGE else None

    # 2. Publish
    ls, server = labelling.connect(cfg)
    images, pixels, full_sizes = labelling.task_images(cfg, source, image_ids, quarantine, STAGE)
    if gold is not None:  # gold tasks: their embeddings are precomputed below, so clicks never read the source
        g_images, g_pixels, g_sizes = labelling.task_images(cfg, gold.source, gold.image_ids, None, STAGE)
        images = mixed_in(images, [replace(im, image_id=GOLD_PREFIX + im.image_id) for im in g_images])
        pixels.update({GOLD_PREFIX + i: px for i, px in g_pixels.items()})
        full_sizes.update({GOLD_PREFIX + i: size for i, size in g_sizes.items()})
        if hasattr(annotators, "truth"):  # simulated annotators know the gold masks as they know the rest
            annotators = replace_truth(annotators, {GOLD_PREFIX + i: objs for i, objs in gold.truth.items()})
    precomputed = precompute_embeddings(segmenter, list(pixels.items()), cfg.path("embeddings"))
    project_id, tasks = labelling.publish(ls, cfg, labelling.project_title(cfg, purpose, round),
                                          project_description(purpose, round, segmenter.model_version), images)
    if purpose == STAGE and cfg.stages.manual.double_share > 0:
        ls.set_double_share(project_id, cfg.stages.manual.double_share)

    # 3. Annotate or wait
    with labelling.start_ml_backend(cfg, segmenter, source, ls.url, people=not annotators.simulated,
                                    checkpoint=checkpoint) as backend:
        labelling.prefetch_embeddings(backend, images)
        efforts = annotators.annotate(ls, cfg, project_id, tasks, images,
                                      labelling.connect_backend(ls, project_id, backend), server)
        embeddings = embedding_figures(backend, precomputed)

    # 4. Pull with lineage
    pulled = pull_to_store(ls, project_id, store, round, segmenter.model_version, quarantine, tasks, full_sizes)

    # 5. Summarise
    gold_records, pairs = pulled.pop("gold_records"), pulled.pop("agreement_pairs")
    agreement.record(cfg.workdir, round, pairs)
    real = sorted(i for i in tasks if not i.startswith(GOLD_PREFIX))
    return ManualSummary(
        round=round, images=len(real), ls_project_id=project_id, ls_url=ls.url,
        model_version=segmenter.model_version, pull=pulled, embeddings=embeddings,
        simulated=effort_summary(efforts) if annotators.simulated else None, wall_s=round_(time.monotonic() - t0, 1),
        gold=score_gold(gold_records, gold) if gold is not None else None,
        agreement={"tasks": len(pairs), "pairs": pairs} if pairs else None, **effort_figures(store, round, real))


def replace_truth(annotators: "SimulatedAnnotate", extra: dict) -> "SimulatedAnnotate":
    """The same simulated annotators, knowing `extra` masks too."""
    return SimulatedAnnotate({**annotators.truth, **extra}, annotators.every_object)


def project_description(purpose: str, round: int, model_version: str) -> str:
    """The Label Studio project's description; a holdout's tells people to draw every object."""
    description = f"round {round}, model {model_version}"
    if purpose == "holdout":  # promotion is judged on these masks: an object left out is a figure gone wrong
        description = (f"HOLDOUT: draw EVERY object on each image (every model is judged on these masks; "
                       f"an object left out skews every figure). {description}")
    return description


def embedding_figures(backend, precomputed: int) -> dict:
    """The backend's embedding cache figures (hits, misses, precomputed), or the service's URL when another
    process served the round."""
    cache = getattr(backend.state.predictor, "cache", None)  # None: the service (another process) served
    if cache is None:
        return {"service": backend.url, "precomputed_now": precomputed}
    return {"hits": cache.hits, "misses": cache.misses, "precomputed": cache.precomputed,
            "precomputed_now": precomputed}


def effort_figures(store, round: int, image_ids: list[str]) -> dict:
    """masks, masks_per_image, clicks_per_mask, seconds_per_mask of the round's stored masks on `image_ids`."""
    masks = store.read_table(columns=["image_id", "clicks", "lead_time_s"], stage=STAGE, round=round,
                             image_ids=image_ids)
    n = masks.num_rows
    clicks = [c for c in masks.column("clicks").to_pylist() if c is not None]
    secs = [s for s in masks.column("lead_time_s").to_pylist() if s is not None]
    return {"masks": n, "masks_per_image": _mean([n], len(image_ids)), "clicks_per_mask": _mean(clicks, len(clicks)),
            "seconds_per_mask": _mean(secs, len(secs))}


def _mean(values: list[float], n: int) -> float | None:
    return round_(sum(values) / n) if n else None


def round_(v: float, digits: int = 3) -> float:
    return round(float(v), digits)
