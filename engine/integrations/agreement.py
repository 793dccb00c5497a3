"""Agreement between annotators, kept across rounds: the manual stage scores the tasks two people drew, the
review stage reads which annotators fall below `stages.review.min_agreement`. One small JSON file in the work
dir (<workdir>/annotators/agreement.json), written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from model.iou import pairwise_mask_iou


def pair_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """How much two people's masks of one image agree: each mask's IoU to the other person's mask it overlaps
    most, averaged over both people's masks. a: (Na, H, W) bool, b: (Nb, H, W) bool."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) == 0 or len(b) == 0:
        return 0.0
    iou = pairwise_mask_iou(a, b)
    return float(np.concatenate([iou.max(axis=1), iou.max(axis=0)]).mean())


def _path(workdir: str | Path) -> Path:
    return Path(workdir) / "annotators" / "agreement.json"


def read(workdir: str | Path) -> dict[str, dict]:
    """{annotator: {"tasks": n, "iou_sum": x}} over every round so far ({} before any double task)."""
    try:
        return json.loads(_path(workdir).read_text())
    except (OSError, ValueError):
        return {}


def record(workdir: str | Path, round: int, pairs: list[tuple[str, str, float]]) -> None:
    """Add a round's (annotator, annotator, agreement) pairs; a round recorded twice (a rerun) counts once."""
    data = read(workdir)
    done = set(data.pop("_rounds", []))
    if round in done or not pairs:
        return
    for a, b, score in pairs:
        for who in (a, b):
            d = data.setdefault(who, {"tasks": 0, "iou_sum": 0.0})
            d["tasks"] += 1
            d["iou_sum"] += score
    data["_rounds"] = sorted(done | {round})
    path = _path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def by_annotator(workdir: str | Path) -> dict[str, dict]:
    """{annotator: {"double_tasks", "agreement"}} (mean agreement on the tasks they shared with someone)."""
    return {who: {"double_tasks": d["tasks"], "agreement": d["iou_sum"] / d["tasks"]}
            for who, d in read(workdir).items() if not who.startswith("_") and d["tasks"]}


def below(workdir: str | Path, min_agreement: float) -> set[str]:
    """Annotators whose agreement so far is below `min_agreement`."""
    return {who for who, d in by_annotator(workdir).items() if d["agreement"] < min_agreement}
