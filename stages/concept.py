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
written twice. Bad images go to the quarantine, as in the automatic stage.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engine.integrations import runtime
from engine.integrations.cluster import init_ray, map_with_actor_pool
from engine.integrations.config import EngineConfig
from model.segmenter import failure_kind
from storage.images import BadImage
from storage.records import MaskRecord, make_mask_id
from storage.rle import encode_masks, rle_area, rle_bbox
from storage.shards import ShardInfo

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
    areas, boxes = rle_area(rles), rle_bbox(rles)
    h, w = masks[0].mask.shape
    return [MaskRecord(image_id=image_id, mask_id=make_mask_id(image_id, STAGE, model_version, phrase, i),
                       height=h, width=w, rle=rle, area=int(a), bbox=[float(v) for v in b], stage=STAGE,
                       origin=STAGE, round=round, model_version=model_version, predicted_iou=m.score,
                       prompt_text=phrase)
            for i, (m, rle, a, b) in enumerate(zip(masks, rles, areas, boxes))]


class ConceptActor:
    """Ray Data actor: the SAM 3 model once; per image, its embedding once and every phrase asked for. The batch's
    masks go to the store as one part (`MaskStore.write_part`, tagged with the run's key). Returns one row:
    {"part": the part's ShardInfo as JSON or "", "images": JSON list of {"image_id", "status", "reason", "kind",
    "masks", "per_phrase", "seconds"}}."""

    def __init__(self, cfg: EngineConfig, round: int, key: str, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.model = runtime.concept_segmenter(cfg)
        self.source = runtime.image_source(cfg)
        self.store = runtime.mask_store(cfg)
        self.settings = cfg.stages.concept
        self.round, self.key = round, key

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines, records_all = [], []
        for image_id, phrases in zip(batch["image_id"], batch["phrases"]):
            t0 = time.perf_counter()
            image_id, phrases = str(image_id), [str(p) for p in phrases.split("\n")] if phrases else []
            status, reason, kind, records = "ok", "", "", []
            try:
                image = self.source.load(self.source.ref(image_id))
                emb = self.model.embed(image.pixels)
                for phrase in phrases:
                    found = self.model.segment(emb, phrase, self.settings.score_thresh, self.settings.mask_thresh,
                                               self.settings.max_instances)
                    records += concept_records(image_id, phrase, found, self.round, self.model.model_version)
            except BadImage as e:
                status, reason, kind = "bad", str(e), "transient" if e.transient else "permanent"
            except (RuntimeError, MemoryError) as e:  # the model failed on this image: set it aside, go on
                status, reason, kind = "bad", f"{image_id}: the model failed ({type(e).__name__}: {e})"[:300], failure_kind(e)
            per_phrase: dict[str, int] = {}
            for r in records:
                per_phrase[r.prompt_text] = per_phrase.get(r.prompt_text, 0) + 1
            records_all += records
            lines.append({"image_id": image_id, "status": status, "reason": reason, "kind": kind,
                          "masks": len(records), "per_phrase": per_phrase,
                          "seconds": round(time.perf_counter() - t0, 4)})
        part = ""
        if records_all:
            part = json.dumps(asdict(self.store.write_part(records_all, STAGE, self.round, self.key)),
                              separators=(",", ":"))
        return {"part": np.array([part], dtype=object), "images": np.array([json.dumps(lines)], dtype=object)}


@dataclass
class ConceptSummary:
    round: int
    model_version: str
    phrases: int
    images: int = 0
    masks: int = 0
    already_done: int = 0
    set_aside: int = 0
    quarantined: int = 0
    commits: int = 0
    seconds: float = 0.0
    masks_per_phrase: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_concept_stage(cfg: EngineConfig, phrases: list[str], round: int = 0,
                      image_ids: list[str] | None = None) -> ConceptSummary:
    """Every image (or `image_ids`) × every phrase not done yet for this model; resumable, idempotent."""
    c = cfg.stages.concept
    store, quarantine, source = runtime.mask_store(cfg), runtime.quarantine(cfg), runtime.image_source(cfg)
    model = runtime.concept_segmenter(cfg, on_device="cpu")  # for its version (actors build their own)
    version = model.model_version
    key = run_key(version, phrases)
    wanted = [r.image_id for r in source.list()] if image_ids is None else list(dict.fromkeys(image_ids))
    done = store.images_done(STAGE, key)
    held = quarantine.things(STAGE)
    todo = [i for i in wanted if i not in done and source.ref(i).uri not in held]
    summary = ConceptSummary(round=round, model_version=version, phrases=len(phrases),
                             already_done=sum(i in done for i in wanted),
                             set_aside=sum(i not in done and source.ref(i).uri in held for i in wanted))
    if summary.set_aside:
        log.warning("%d image(s) held in the quarantine are skipped (`sa-engine quarantine list`)", summary.set_aside)
    if not todo:
        return summary
    # Per image, the phrases it has no masks for yet under this model (a longer list adds only the new ones)
    have = store.read_table(columns=["image_id", "prompt_text"], stage=STAGE, model_version=version,
                            image_ids=todo).to_pylist()
    seen = {(r["image_id"], r["prompt_text"]) for r in have}
    rows = [{"image_id": i, "phrases": "\n".join(p for p in phrases if (i, p) not in seen)} for i in todo]

    init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    threads = max(1, int(cfg.ray.cpus_per_actor)) if cfg.ray.gpus_per_actor == 0 else 1
    results = map_with_actor_pool(
        rows, ConceptActor, actor_args=(cfg.model_copy(update={"workdir": str(Path(cfg.workdir).resolve())}), round,
                                        key, threads),
        num_actors=max(1, min(c.num_actors, len(todo))), cpus_per_actor=cfg.ray.cpus_per_actor,
        gpus_per_actor=cfg.ray.gpus_per_actor)
    start, since_commit, per_phrase = time.perf_counter(), 0, {p: 0 for p in phrases}
    taken: set[str] = set()
    with store.writer(STAGE, round, key) as writer:
        for row in results:
            lines = json.loads(row["images"])
            if any(ln["image_id"] in taken for ln in lines if ln["status"] == "ok"):  # delivered twice
                continue
            if row["part"]:
                writer.adopt(ShardInfo.from_json(json.loads(row["part"])))
            for line in lines:
                image_id = line["image_id"]
                if line["status"] == "ok":
                    writer.image_done(image_id, int(line["masks"]))
                    taken.add(image_id)
                    summary.images += 1
                    summary.masks += int(line["masks"])
                    for phrase, n in line["per_phrase"].items():
                        per_phrase[phrase] = per_phrase.get(phrase, 0) + n
                else:
                    quarantine.add(source.ref(image_id).uri, line["reason"], STAGE, line["kind"] or "permanent")
                    summary.quarantined += 1
                since_commit += 1
            if since_commit >= c.images_per_commit:
                writer.commit()
                summary.commits += 1
                since_commit = 0
        if since_commit:
            writer.commit()
            summary.commits += 1
    summary.seconds = round_(time.perf_counter() - start)
    summary.masks_per_phrase = per_phrase
    return summary


def round_(x: float) -> float:
    return float(f"{x:.4g}")
