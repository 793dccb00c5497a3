"""How a simulated annotator reviews prefilled masks, and how the prefill audit is measured.

A human looking at a prefilled mask decides at a glance: keep it, fix it, or delete it. The simulated
annotator does the same against the synthetic ground truth, with a glance that is deliberately coarser
than the precision target (`ReviewPolicy.accept_iou` < the stage's `precision_iou`): like a person, it
accepts masks that look right but are a little off. That is why a random audit share of accepted
prefills is checked against the truth afterwards (`audit_accepted`): the prefill error rate is measured,
not assumed.

Decision rule (`review_prefills`), prefills taken in rank order (best first), each truth object claimed once:
  - best unclaimed truth object at IoU >= accept_iou -> "accept" (kept as is, claims the object);
  - IoU >= edit_iou -> "edit" (the right object, visibly off: the annotator corrects it, claims the object);
  - otherwise, or when every object it overlaps is already claimed, or it looks like a mask already kept
    (IoU >= accept_iou: a duplicate to the eye) -> "delete".
Then the annotator clicks only the truth objects that no kept mask covers (`uncovered_objects`).
The decisions are pure numpy; `PrefillReviewer` carries them out through the real Label Studio API with
a `engine.integrations.annotator.SimulatedAnnotator` (its click loop fixes edited prefills and draws missing objects).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.integrations.labelstudio import OBJECT_LABEL, PREFILL_LABEL, brush_result
from engine.integrations.annotator import objects_in_frame
from model.iou import pairwise_mask_iou


@dataclass(frozen=True)
class ReviewPolicy:
    """accept_iou: a glance can't tell masks above this from perfect; edit_iou: below this the prefill is the
    wrong thing (deleted, not fixed); cover_iou: a truth object counts as done when a kept mask matches it
    at this IoU (the annotator does not click it again)."""

    accept_iou: float = 0.85
    edit_iou: float = 0.5
    cover_iou: float = 0.5


@dataclass(frozen=True)
class PrefillDecision:
    """action: "accept" | "edit" | "delete"; truth_index: the claimed truth object (None for deletions);
    iou: the prefill's IoU to that object (to its best object for deletions, 0 if none)."""

    action: str
    truth_index: int | None
    iou: float


def review_prefills(prefills: np.ndarray, truth: np.ndarray, policy: ReviewPolicy,
                    claimed: set[int] | None = None, kept: np.ndarray | None = None) -> list[PrefillDecision]:
    """Accept / edit / delete each prefill (rule: module doc).

    prefills: (P, H, W) bool in rank order; truth: (T, H, W) bool; claimed: truth objects already taken and
    kept: (K, H, W) bool masks already kept (e.g. on an earlier page of the same image); neither is modified.
    A prefill that looks like a kept mask (IoU >= accept_iou) is a duplicate to the eye and is deleted,
    whatever truth object it might also match (e.g. a part covering most of its object).
    """
    taken = set(claimed or ())
    ious = pairwise_mask_iou(prefills, truth)
    hw = prefills.shape[1:]
    earlier = kept if kept is not None else np.zeros((0, *hw), bool)
    same = pairwise_mask_iou(prefills, earlier).max(axis=1) if len(earlier) else np.zeros(len(prefills))
    among = pairwise_mask_iou(prefills, prefills)
    kept_here: list[int] = []
    decisions: list[PrefillDecision] = []
    for p in range(len(prefills)):
        if same[p] >= policy.accept_iou or any(among[p, q] >= policy.accept_iou for q in kept_here):
            decisions.append(PrefillDecision("delete", None, float(ious[p].max()) if ious.shape[1] else 0.0))
            continue
        row = ious[p].copy() if ious.shape[1] else np.zeros(0)
        best_any = float(row.max()) if len(row) else 0.0
        if taken:
            row[list(taken)] = -1.0
        j = int(np.argmax(row)) if len(row) else -1
        iou = float(row[j]) if j >= 0 else 0.0
        if j >= 0 and iou >= policy.accept_iou:
            decisions.append(PrefillDecision("accept", j, iou))
            taken.add(j)
            kept_here.append(p)
        elif j >= 0 and iou >= policy.edit_iou:
            decisions.append(PrefillDecision("edit", j, iou))
            taken.add(j)
            kept_here.append(p)
        else:
            decisions.append(PrefillDecision("delete", None, best_any))
    return decisions


def uncovered_objects(kept: np.ndarray, truth: np.ndarray, cover_iou: float,
                      objects: list[int] | None = None) -> list[int]:
    """Truth objects (indices, ascending) that no kept mask matches at IoU >= cover_iou.

    kept: (K, H, W) bool final masks; truth: (T, H, W) bool; objects: which truth indices the annotator
    is asked to draw (None: all).
    """
    wanted = list(range(len(truth))) if objects is None else sorted(objects)
    if len(kept) == 0:
        return wanted
    best = pairwise_mask_iou(truth[wanted], kept).max(axis=1) if wanted else np.zeros(0)
    return [t for t, b in zip(wanted, best) if b < cover_iou]


def choose_audit(n_accepted: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of the accepted prefills to audit: a random `fraction` of them, at least one when
    there is any and fraction > 0 (a measured rate needs a sample)."""
    if n_accepted <= 0 or fraction <= 0:
        return np.zeros(0, np.int64)
    k = min(n_accepted, max(1, int(round(fraction * n_accepted))))
    return np.sort(rng.choice(n_accepted, size=k, replace=False))


def prefill_precision(n_prefills: int, n_accepted: int, audit_passed: int, audit_total: int,
                      edited_prefill_ious: list[float], precision_iou: float) -> float | None:
    """Estimated share of prefills that were right (IoU >= precision_iou to the final, verified mask).

    Accepted prefills are right at the audit's pass rate (all right if none was audited); an edited prefill
    is right when its IoU to the corrected mask reaches precision_iou; deleted prefills are wrong.
    None when there were no prefills.
    """
    if n_prefills <= 0:
        return None
    pass_rate = audit_passed / audit_total if audit_total > 0 else 1.0
    edited_right = sum(1 for v in edited_prefill_ious if v >= precision_iou)
    return (n_accepted * pass_rate + edited_right) / n_prefills


# --------------------------------------------------------------------------- through Label Studio

@dataclass
class ImageReview:
    """What the reviewer knows about one image across its pages: truth objects claimed, masks kept
    ((H, W) bool each), seconds spent (the annotator's per-image time limit counts all pages)."""

    claimed: set[int] = field(default_factory=set)
    kept: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class TaskReview:
    """One reviewed task: counts, clicks of added masks, and the submitted annotation's id."""

    image_id: str
    task_id: int
    annotation_id: int | None
    accepted: int = 0
    edited: int = 0
    deleted: int = 0
    added: int = 0
    added_clicks: int = 0
    left_unannotated: int = 0
    seconds: float = 0.0


class PrefillReviewer:
    """A simulated annotator reviewing prefilled tasks. annotator: an `engine.integrations.annotator.SimulatedAnnotator`
    (it owns the Label Studio user, the ML backend route and the click settings)."""

    def __init__(self, annotator, policy: ReviewPolicy, seconds_per_review: float):
        self.annotator = annotator
        self.policy = policy
        self.seconds_per_review = float(seconds_per_review)

    def review_task(self, task_id: int, image, prefills: list[tuple[str, np.ndarray]], objects: list,
                    state: ImageReview, add_missing: bool) -> TaskReview:
        """Review one task's prefills, (if `add_missing`) click the objects no kept mask covers, submit.

        image: `engine.integrations.labelstudio.TaskImage`; prefills: (region id, (H, W) bool) in rank order; objects:
        the image's `engine.integrations.annotator.GTObject`s. Kept prefills keep their region id (as Label Studio does
        when a person accepts or edits a prediction), so the pull can tell their lineage.
        """
        a, s = self.annotator, self.annotator.settings
        hw = (image.height, image.width)
        objects = objects_in_frame(objects, *hw)  # the truth in the task's frame (large photos are downscaled)
        usable = [o for o in objects if o.mask.shape == hw and int(o.mask.sum()) >= s.min_area]
        truth = np.stack([o.mask for o in usable]) if usable else np.zeros((0, *hw), bool)
        masks = np.stack([m for _, m in prefills]) if prefills else np.zeros((0, *hw), bool)
        out = TaskReview(image.image_id, task_id, None)
        results = []
        earlier = np.stack(state.kept) if state.kept else None
        decisions = review_prefills(masks, truth, self.policy, state.claimed, earlier)
        for (region_id, mask), d in zip(prefills, decisions):
            out.seconds += self.seconds_per_review
            if d.action == "accept":
                out.accepted += 1
                state.claimed.add(d.truth_index)
                state.kept.append(mask)
                results.append(brush_result(mask, image.height, image.width, label=PREFILL_LABEL, region_id=region_id, meta={
                    "annotator": a.name, "review": "accepted", "clicks": 0,
                    "lead_time_s": self.seconds_per_review, "review_iou": round(d.iou, 4)}))
            elif d.action == "edit" and self._has_time(state, out):
                final, effort = a.annotate_object(task_id, image, usable[d.truth_index])
                out.edited += 1
                out.seconds += effort.seconds
                state.claimed.add(d.truth_index)
                state.kept.append(final)
                meta = a.region_meta(effort)
                meta.update(review="edited", lead_time_s=round(effort.seconds + self.seconds_per_review, 3))
                results.append(brush_result(final, image.height, image.width, label=PREFILL_LABEL, region_id=region_id,
                                            meta=meta))
            else:  # wrong, a duplicate, or no time left to fix it
                out.deleted += 1
        if add_missing:
            kept = np.stack(state.kept) if state.kept else np.zeros((0, *hw), bool)
            wanted = [i for i, o in enumerate(usable) if o.parent_id is None]
            missing = uncovered_objects(kept, truth, self.policy.cover_iou, wanted)
            missing.sort(key=lambda i: -int(usable[i].mask.sum()))  # largest first, as the annotator does
            for k, i in enumerate(missing):
                if not self._has_time(state, out):
                    out.left_unannotated = len(missing) - k
                    break
                final, effort = a.annotate_object(task_id, image, usable[i])
                out.added += 1
                out.added_clicks += effort.clicks
                out.seconds += effort.seconds
                state.kept.append(final)
                results.append(brush_result(final, image.height, image.width, label=OBJECT_LABEL,
                                            region_id=f"added-{usable[i].ann_id}", meta=a.region_meta(effort)))
        state.seconds += out.seconds
        # Submitted even when empty: an empty annotation says "every prefill deleted, nothing missing".
        out.annotation_id = a.ls.create_annotation(task_id, results, out.seconds, user_id=a.user_id)
        return out

    def _has_time(self, state: ImageReview, out: TaskReview) -> bool:
        s = self.annotator.settings
        return state.seconds + out.seconds + s.seconds_per_mask + s.seconds_per_click <= s.image_time_limit_s
