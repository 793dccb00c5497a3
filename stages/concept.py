"""The concept stage (SAM 3): a list of noun phrases, every image × phrase, every instance of each phrase.

    sa-engine stage concept --config engine.yaml --phrases phrases.txt

Each image is embedded once on a Ray Data actor (the model built once per actor), then each phrase costs SAM 3's
text encoder and detector. The actor writes its batch's masks to the shard store itself (a staged part, as the
automatic stage's actors do) and hands back the part's descriptor; the driver commits. Masks have stage
"concept", their phrase in `prompt_text` and the concept score in `predicted_iou`; the COCO export makes one
category per phrase.

Resuming: a run is keyed by the model and the phrase list (the image index's model_version is
`<model_version>#phrases-<digest>`, the masks' own model_version is the model's). A rerun of the same list skips
finished images; a longer list runs, per image, only the phrases that image has no masks for yet, so no mask is
written twice. Bad images and images the model fails on go to the quarantine through the stage kit
(engine/integrations/stage_kit.py), as in the automatic stage.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.integrations import runtime
from engine.integrations.config import EngineConfig
from engine.integrations.runtime import Resources
from engine.integrations.stage_kit import OK, PoolPlan, images_to_do, outcome_of, part_row, round_, run_on_pool
from model.concept import ConceptSegmenter
from storage.images import BadImage
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_masks

log = logging.getLogger(__name__)

STAGE = "concept"


def read_phrases(path: str | Path) -> list[str]:
    """One noun phrase per line (blank lines and `#` comments skipped, duplicates once, order kept).
    Raises ValueError (one line) for a missing or empty file."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read the phrase list ({type(e).__name__})") from None
    phrases = list(dict.fromkeys(s.strip() for s in lines if s.strip() and not s.strip().startswith("#")))
    if not phrases:
        raise ValueError(f"{p}: no phrases (one noun phrase per line)")
    return phrases


def run_key(model_version: str, phrases: list[str]) -> str:
    """The image index's key of a run: the model and the phrase list."""
    digest = hashlib.sha256("\n".join(sorted(phrases)).encode()).hexdigest()[:8]
    return f"{model_version}#phrases-{digest}"


def concept_records(image_id: str, phrase: str, masks, round: int, model_version: str) -> list[MaskRecord]:
    """ConceptMasks of one image and phrase -> MaskRecords (ids deterministic in image, phrase, model, rank)."""
    if not masks:
        return []
    rles = encode_masks(np.stack([m.mask for m in masks]))
    return [MaskRecord.from_rle(image_id, make_mask_id(image_id, STAGE, model_version, phrase, i), rle, STAGE, round,
                                origin=STAGE, model_version=model_version, predicted_iou=m.score, prompt_text=phrase)
            for i, (m, rle) in enumerate(zip(masks, rles))]


@dataclass(frozen=True)
class ConceptPlan:
    """A concept-stage run, read from the config once (`plan_concept_stage`): the SAM 3 directory (resolved) and
    its device, the thresholds, the phrases and the pool. Nothing below it sees the config."""

    round: int
    resources: Resources
    checkpoint: str
    device: str
    phrases: list[str]
    score_thresh: float
    mask_thresh: float
    max_instances: int
    pool: PoolPlan
    image_ids: list[str] | None = None

    def segmenter(self, on_device: str | None = None) -> ConceptSegmenter:
        return ConceptSegmenter.load(self.checkpoint, device=on_device or self.device)


def plan_concept_stage(cfg: EngineConfig, phrases: list[str], round: int = 0,
                       image_ids: list[str] | None = None) -> ConceptPlan:
    """The config, read once (the pool's index key, the model and phrase list, is filled in at the run)."""
    c = cfg.stages.concept
    if not c.checkpoint:
        raise ValueError("stages.concept.checkpoint: not set (a transformers SAM 3 directory; docs/models.md)")
    return ConceptPlan(round=round, resources=runtime.resources(cfg), checkpoint=cfg.path(c.checkpoint),
                       device=runtime.device(cfg), phrases=list(phrases), score_thresh=c.score_thresh,
                       mask_thresh=c.mask_thresh, max_instances=c.max_instances,
                       pool=runtime.pool_plan(cfg, STAGE, round, "", c.num_actors, c.images_per_commit),
                       image_ids=image_ids)


class ConceptActor:
    """Ray Data actor: the SAM 3 model once; per image, its embedding once and every phrase asked for. The batch's
    masks go to the store as one part (stage_kit.part_row, tagged with the run's key). Returns one row:
    {"part": the part's ShardInfo as JSON or "", "images": JSON list of {"image_id", "status", "reason", "kind",
    "masks", "per_phrase", "seconds"}} (stage_kit's vocabulary)."""

    def __init__(self, plan: ConceptPlan, key: str):
        torch.set_num_threads(plan.pool.threads)
        self.plan, self.key = plan, key
        self.model = plan.segmenter()
        self.source = plan.resources.image_source()
        self.store = plan.resources.mask_store()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.plan
        lines, records_all = [], []
        for image_id, phrases in zip(batch["image_id"], batch["phrases"]):
            t0, cpu0 = time.perf_counter(), time.process_time()
            image_id, phrases = str(image_id), [str(p) for p in phrases.split("\n")] if phrases else []
            status, reason, kind, records = OK, "", "", []
            try:
                image = self.source.load(self.source.ref(image_id))
                emb = self.model.embed(image.pixels)
                for phrase in phrases:
                    found = self.model.segment(emb, phrase, p.score_thresh, p.mask_thresh, p.max_instances)
                    records += concept_records(image_id, phrase, found, p.round, self.model.model_version)
            except (BadImage, RuntimeError, MemoryError, ValueError) as e:  # set it aside, go on
                status, reason, kind = outcome_of(e)
                records = []
            per_phrase: dict[str, int] = {}
            for r in records:
                per_phrase[r.prompt_text] = per_phrase.get(r.prompt_text, 0) + 1
            records_all += records
            lines.append({"image_id": image_id, "status": status, "reason": reason, "kind": kind,
                          "masks": len(records), "per_phrase": per_phrase,
                          "seconds": round(time.perf_counter() - t0, 4),
                          "cpu_seconds": round(time.process_time() - cpu0, 4)})
        return part_row(self.store, records_all, STAGE, p.round, self.key, lines)


@dataclass
class ConceptSummary:
    round: int
    model_version: str
    phrases: int
    images: int = 0
    masks: int = 0
    already_done: int = 0
    set_aside: int = 0
    retried: int = 0
    quarantined: int = 0
    commits: int = 0
    seconds: float = 0.0
    masks_per_phrase: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_concept_stage(cfg: EngineConfig, phrases: list[str], round: int = 0,
                      image_ids: list[str] | None = None) -> ConceptSummary:
    """Every image (or `image_ids`) × every phrase not done yet for this model; resumable, idempotent."""
    return run_concept_plan(plan_concept_stage(cfg, phrases, round, image_ids))


def run_concept_plan(plan: ConceptPlan) -> ConceptSummary:
    """Plan -> the phrases each image still needs -> the actor pool and commits (stage_kit.run_on_pool)."""
    res = plan.resources
    store, quarantine, source = res.mask_store(), res.quarantine(), res.image_source()
    version = plan.segmenter(on_device="cpu").model_version  # for its version (actors build their own)
    key = run_key(version, plan.phrases)
    images = images_to_do(store, quarantine, source, STAGE, key, plan.image_ids)
    summary = ConceptSummary(round=plan.round, model_version=version, phrases=len(plan.phrases),
                             already_done=images.already_done, set_aside=images.set_aside,
                             retried=len(images.retrying))
    if not images.todo:
        return summary
    # Per image, the phrases it has no masks for yet under this model (a longer list adds only the new ones)
    have = store.read_table(columns=["image_id", "prompt_text"], stage=STAGE, model_version=version,
                            image_ids=images.todo).to_pylist()
    seen = {(r["image_id"], r["prompt_text"]) for r in have}
    rows = [{"image_id": i, "phrases": "\n".join(p for p in plan.phrases if (i, p) not in seen)}
            for i in images.todo]
    done = run_on_pool(replace(plan.pool, index_key=key), images, rows, ConceptActor, (plan, key), store,
                       quarantine, source)
    per_phrase = {p: 0 for p in plan.phrases}
    for line in done.ok_lines:
        for phrase, n in line["per_phrase"].items():
            per_phrase[phrase] = per_phrase.get(phrase, 0) + n
    summary.images, summary.masks, summary.quarantined = done.images, done.masks, done.quarantined
    summary.commits, summary.seconds, summary.masks_per_phrase = done.commits, round_(done.seconds), per_phrase
    return summary
