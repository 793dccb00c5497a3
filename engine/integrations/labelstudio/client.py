"""The Label Studio client: the labeling config, the project types and every SDK call (see the package's
docstring)."""
from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from storage.brush_rle import BrushRLEError, decode_mask, mask_to_rle
from engine.integrations.labelstudio.errors import LabelStudioError, LabelStudioUnavailable


# --------------------------------------------------------------------------- labeling config

MASK_TAG, IMAGE_TAG, CLICK_TAG, BOX_TAG = "mask", "image", "click", "box"
OBJECT_LABEL, PREFILL_LABEL = "object", "prefill"


ANNOTATOR_INSTRUCTIONS = (
    "Switch on Auto-Annotation (below the image) once. Pick the Auto-Detect point tool (pink dots, at the bottom "
    "of the toolbar; M switches between the Auto-Detect tools), press 1 (positive) and click an object: the "
    "model draws its mask. Press 2 (negative) and click to remove a wrong part; the Auto-Detect box (3) takes a "
    "box around the object. Fix edges with the brush (B). Orange masks are the model's suggestions: keep the good "
    "ones, fix or delete the rest. Not sure a mask is right? Select it and tick unsure: a second person "
    "reviews it. Submit when every object has one mask.")


CONCEPT_TAG = "concept"
UNSURE_TAG = "unsure"  # per-region choice: the annotator doubts this mask (it goes to the review queue)


def concept_prompt_tag() -> str:
    """The TextArea that sends a noun phrase to our ML backend (SAM 3 concept prompts: every instance)."""
    return (f'  <TextArea name="{CONCEPT_TAG}" toName="{IMAGE_TAG}" smart="true" editable="true" maxSubmissions="1"'
            ' placeholder="a noun phrase: every instance becomes a mask"/>\n')


def labeling_config(concept: bool = False) -> str:
    """The project's labeling config: brush masks, smart positive/negative keypoints and smart boxes, and the
    instructions above the image.

    Brush labels: "object" (drawn or accepted by an annotator, blue) and "prefill" (imported predictions,
    orange: distinct from the annotator's own). The keypoints and boxes are prompts for our ML backend only
    (smartOnly: Label Studio offers them as its Auto-Detect tools once Auto-Annotation is on, which the
    instructions above the image say; a plain keypoint tool would only make useless regions), labels on hotkeys
    1/2/3; the pull reads brush regions only. tests/test_browser.py drives this page in a real browser.
    concept: add the TextArea of SAM 3 concept prompts (a phrase -> every instance as brush regions).
    """
    return f"""<View>
  <Header value="{ANNOTATOR_INSTRUCTIONS}" size="6"/>
  <Image name="{IMAGE_TAG}" value="$image" zoom="true" zoomControl="true" rotateControl="false"/>
  <BrushLabels name="{MASK_TAG}" toName="{IMAGE_TAG}">
    <Label value="{OBJECT_LABEL}" background="#1f77b4" hotkey="b"/>
    <Label value="{PREFILL_LABEL}" background="#ff7f0e"/>
  </BrushLabels>
  <KeyPointLabels name="{CLICK_TAG}" toName="{IMAGE_TAG}" smart="true" smartOnly="true">
    <Label value="positive" background="#2ca02c" hotkey="1"/>
    <Label value="negative" background="#d62728" hotkey="2"/>
  </KeyPointLabels>
  <RectangleLabels name="{BOX_TAG}" toName="{IMAGE_TAG}" smart="true" smartOnly="true">
    <Label value="{OBJECT_LABEL}" background="#9467bd" hotkey="3"/>
  </RectangleLabels>
  <Choices name="{UNSURE_TAG}" toName="{IMAGE_TAG}" perRegion="true" choice="multiple" showInline="true">
    <Choice value="{UNSURE_TAG}"/>
  </Choices>
{concept_prompt_tag() if concept else ""}</View>"""


# --------------------------------------------------------------------------- project types


@dataclass
class TaskImage:
    """One task = one image. url: what Label Studio's editor loads (a /data/local-files/ URL or an
    s3:// URL resolved by a cloud storage); height/width: pixels of the stored image the masks use."""

    image_id: str
    url: str
    height: int
    width: int


@dataclass
class PrefillMask:
    """A pre-annotation: one brush region per mask. mask: (H, W) bool."""

    mask: Any
    score: float | None = None
    label: str = PREFILL_LABEL
    region_id: str | None = None  # default: a stable id derived from the position in the list


@dataclass
class PulledRegion:
    """One brush region of a submitted annotation, decoded. mask: (H, W) bool.

    prediction_id / prediction_region_id: the prediction (and its region) this region started from,
    when the annotator accepted or edited a pre-annotation (Label Studio keeps the region id);
    prediction_mask: that region's mask as predicted, so callers can tell accepted from edited.
    meta: what the annotating tool stored with the region (our simulated annotator: clicks, seconds).
    """

    region_id: str
    label: str
    mask: Any
    prediction_id: int | None = None
    prediction_region_id: str | None = None
    prediction_mask: Any = None
    meta: dict = field(default_factory=dict)
    unsure: bool = False  # the annotator ticked "unsure" on this region (the review queue takes it)


@dataclass
class PulledAnnotation:
    task_id: int
    annotation_id: int
    image_id: str
    height: int
    width: int
    annotator: str
    lead_time_s: float | None
    updated_at: str | None
    regions: list[PulledRegion]


@dataclass
class PullResult:
    """A project's submitted annotations, decoded; `problems`: (thing, reason) for what was skipped."""

    annotations: list[PulledAnnotation]
    problems: list[tuple[str, str]]
    task_ids: list[int]


def brush_result(mask, height: int, width: int, label: str = OBJECT_LABEL, region_id: str | None = None,
                 meta: dict | None = None) -> dict:
    """A Label Studio brush region for a (H, W) bool mask (RLE from storage/brush_rle.py)."""
    out = {"id": region_id or secrets.token_hex(5), "type": "brushlabels", "from_name": MASK_TAG,
           "to_name": IMAGE_TAG, "original_width": int(width), "original_height": int(height),
           "image_rotation": 0, "origin": "manual",
           "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}
    if meta:
        out["meta"] = meta
    return out


def unsure_result(region_id: str, height: int, width: int) -> dict:
    """The per-region "unsure" choice Label Studio stores for a brush region the annotator doubts."""
    return {"id": region_id, "type": "choices", "from_name": UNSURE_TAG, "to_name": IMAGE_TAG,
            "original_width": int(width), "original_height": int(height), "image_rotation": 0,
            "value": {"choices": [UNSURE_TAG]}}


def keypoint_context(points, labels, height: int, width: int) -> dict:
    """Interactive context as Label Studio's editor sends it: keypoints in percent of the image.

    points: (K, 2) XY pixels; labels: (K,) 1 positive / 0 negative.
    """
    result = []
    for (x, y), lab in zip(points, labels):
        result.append({"type": "keypointlabels", "from_name": CLICK_TAG, "to_name": IMAGE_TAG,
                       "original_width": int(width), "original_height": int(height), "image_rotation": 0,
                       "is_positive": bool(lab),
                       "value": {"x": 100.0 * (float(x) + 0.5) / width, "y": 100.0 * (float(y) + 0.5) / height,
                                 "width": 0.5, "keypointlabels": ["positive" if lab else "negative"]}})
    return {"result": result}


# --------------------------------------------------------------------------- the SDK edge

_RETRY_STATUS = {408, 429, 502, 503, 504}


class LabelStudio:
    """Label Studio's API in project types. Every call retries on connection errors and 5xx
    gateway errors with exponential backoff, then raises LabelStudioUnavailable (one line)."""

    def __init__(self, url: str, token: str, retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 120.0):
        from label_studio_sdk import LabelStudio as _SDK  # deferred: a ~1 s import, paid only by code that talks to a server

        self.url = url.rstrip("/")
        self.token = token
        self.retries, self.backoff_s = retries, backoff_s
        self.sdk = _SDK(base_url=self.url, api_key=token, timeout=timeout_s)
        # Our retry policy is the only one (the SDK would add its own retries under ours).
        http = getattr(getattr(self.sdk, "_client_wrapper", None), "httpx_client", None)
        if http is not None and hasattr(http, "base_max_retries"):
            http.base_max_retries = 0

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        import httpx  # deferred with the SDK (above), whose transport it is
        from label_studio_sdk.core.api_error import ApiError

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (httpx.TransportError, ApiError) as e:
                status = getattr(e, "status_code", None)
                transient = isinstance(e, httpx.TransportError) or status in _RETRY_STATUS
                if not transient:
                    body = str(getattr(e, "body", "") or e).replace("\n", " ")[:300]
                    raise LabelStudioError(f"Label Studio {self.url}: {what} failed ({status}): {body}") from None
                if attempt == self.retries:
                    raise LabelStudioUnavailable(
                        f"Label Studio {self.url}: unreachable during {what} after {self.retries + 1} tries "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
                time.sleep(delay)
                delay *= 2

    # ---- users
    def user_id(self, email: str) -> int:
        """The id of the user with this email, created (no password, no login) if missing."""
        for u in self._call("list users", lambda: list(self.sdk.users.list())):
            if u.email == email:
                return int(u.id)
        user = self._call("create user", lambda: self.sdk.users.create(
            email=email, username=email.split("@")[0], first_name=email.split("@")[0]))
        return int(user.id)

    def user_emails(self) -> dict[int, str]:
        return {int(u.id): u.email for u in self._call("list users", lambda: list(self.sdk.users.list()))}

    # ---- projects
    def find_project(self, title: str) -> int | None:
        for p in self._call("list projects", lambda: list(self.sdk.projects.list(title=title))):
            if p.title == title:
                return int(p.id)
        return None

    def ensure_project(self, title: str, description: str = "", concept: bool = False) -> int:
        """The project with this title (created with our labeling config if missing; concept: with the
        TextArea of SAM 3 concept prompts)."""
        pid = self.find_project(title)
        if pid is not None:
            return pid
        project = self._call("create project", lambda: self.sdk.projects.create(
            title=title, description=description, label_config=labeling_config(concept),
            expert_instruction=f"<p>{ANNOTATOR_INSTRUCTIONS}</p>", show_instruction=True,
            show_collab_predictions=True, evaluate_predictions_automatically=False))
        return int(project.id)

    def delete_project(self, project_id: int) -> None:
        self._call("delete project", lambda: self.sdk.projects.delete(id=project_id))

    def add_local_storage(self, project_id: int, folder: Path | str) -> int:
        """Let the project serve files under `folder` (which must be under the server's
        LOCAL_FILES_DOCUMENT_ROOT). Idempotent."""
        folder = str(Path(folder).resolve())
        existing = self._call("list storages", lambda: list(self.sdk.import_storage.local.list(project=project_id)))
        for s in existing:
            if s.path == folder:
                return int(s.id)
        st = self._call("add local storage", lambda: self.sdk.import_storage.local.create(
            project=project_id, path=folder, use_blob_urls=True, title=f"sa-engine {Path(folder).name}"))
        return int(st.id)

    @staticmethod
    def local_file_url(path: Path | str, document_root: Path | str) -> str:
        """The URL Label Studio serves a local file under (relative to its document root)."""
        rel = Path(path).resolve().relative_to(Path(document_root).resolve())
        return f"/data/local-files/?d={quote(str(rel))}"

    # ---- tasks and predictions
    def tasks(self, project_id: int) -> list:
        """The project's tasks as the SDK gives them (.id, .data, annotation counts)."""
        return self._call("list tasks", lambda: list(self.sdk.tasks.list(project=project_id, fields="all")))

    def task_ids(self, project_id: int) -> dict[str, int]:
        """image_id -> task id of the project's tasks."""
        out = {}
        for t in self.tasks(project_id):
            image_id = (t.data or {}).get("image_id")
            if image_id is not None:
                out[image_id] = int(t.id)
        return out

    def annotated_task_ids(self, project_id: int) -> set[int]:
        """Tasks that have at least one submitted (not cancelled) annotation."""
        return {int(t.id) for t in self.tasks(project_id)
                if (getattr(t, "total_annotations", 0) or 0) - (getattr(t, "cancelled_annotations", 0) or 0) > 0}

    def import_tasks(self, project_id: int, images: list[TaskImage],
                     prefills: dict[str, list[PrefillMask]] | None = None,
                     model_version: str | None = None) -> dict[str, int]:
        """One task per image (skipping images the project already has), with the prefills of each
        image as one prediction (one brush region per mask, `model_version` set).
        Returns image_id -> task id for all the given images."""
        have = self.task_ids(project_id)
        new = [im for im in images if im.image_id not in have]
        if new:
            payload = []
            for im in new:
                task = {"data": {"image": im.url, "image_id": im.image_id, "height": im.height, "width": im.width}}
                masks = (prefills or {}).get(im.image_id) or []
                if masks:
                    task["predictions"] = [self._prediction(im, masks, model_version)]
                payload.append(task)
            self._call("import tasks", lambda: self.sdk.projects.import_tasks(
                id=project_id, request=payload, return_task_ids=True, commit_to_project=True))
            have = self.task_ids(project_id)
        missing = [im.image_id for im in images if im.image_id not in have]
        if missing:
            raise LabelStudioError(f"project {project_id}: tasks for {missing[:3]} were not created")
        return {im.image_id: have[im.image_id] for im in images}

    @staticmethod
    def _prediction(im: TaskImage, masks: list[PrefillMask], model_version: str | None) -> dict:
        result = [brush_result(p.mask, im.height, im.width, label=p.label,
                               region_id=p.region_id or f"p{im.image_id[-6:]}-{i}".replace("/", "_"))
                  for i, p in enumerate(masks)]
        scores = [p.score for p in masks if p.score is not None]
        return {"result": result, "model_version": model_version or "",
                "score": float(sum(scores) / len(scores)) if scores else None}

    def create_prediction(self, task_id: int, im: TaskImage, masks: list[PrefillMask],
                          model_version: str | None) -> int:
        pred = self._prediction(im, masks, model_version)
        out = self._call("create prediction", lambda: self.sdk.predictions.create(
            task=task_id, result=pred["result"], model_version=pred["model_version"], score=pred["score"]))
        return int(out.id)

    # ---- annotations
    def create_annotation(self, task_id: int, results: list[dict], lead_time_s: float,
                          user_id: int | None = None, parent_prediction: int | None = None) -> int:
        kwargs = {"id": task_id, "result": results, "lead_time": float(lead_time_s)}
        if user_id is not None:
            kwargs["completed_by"] = user_id
        if parent_prediction is not None:
            kwargs["parent_prediction"] = parent_prediction
        ann = self._call("create annotation", lambda: self.sdk.annotations.create(**kwargs))
        return int(ann.id)

    def update_annotation(self, annotation_id: int, results: list[dict], lead_time_s: float | None = None) -> None:
        kwargs = {"id": annotation_id, "result": results}
        if lead_time_s is not None:
            kwargs["lead_time"] = float(lead_time_s)
        self._call("update annotation", lambda: self.sdk.annotations.update(**kwargs))

    def set_double_share(self, project_id: int, share: float) -> None:
        """Have `share` of the project's tasks drawn by two annotators (Label Studio picks which and serves them
        to a second person in its labelling stream); 0: one annotation per task."""
        pct = int(round(100 * share))
        self._call("set overlap", lambda: self.sdk.projects.update(
            id=project_id, maximum_annotations=2 if pct else 1, overlap_cohort_percentage=pct or 100))

    def double_task_ids(self, project_id: int) -> set[int]:
        """The tasks Label Studio wants two annotations on."""
        return {int(t.id) for t in self.tasks(project_id) if (getattr(t, "overlap", 1) or 1) > 1}

    def delete_task(self, task_id: int) -> None:
        self._call("delete task", lambda: self.sdk.tasks.delete(id=task_id))

    # ---- ML backend
    def connect_ml_backend(self, project_id: int, url: str, user: str, password: str,
                           title: str = "sa-engine", timeout_s: float = 100.0) -> int:
        """Attach our ML backend (basic auth) as the project's interactive backend. Idempotent."""
        for b in self._call("list ML backends", lambda: list(self.sdk.ml.list(project=project_id))):
            if b.url.rstrip("/") == url.rstrip("/"):
                return int(b.id)
        b = self._call("connect ML backend", lambda: self.sdk.ml.create(
            project=project_id, url=url, title=title, is_interactive=True, auth_method="BASIC_AUTH",
            basic_auth_user=user, basic_auth_pass=password, timeout=timeout_s))
        return int(b.id)

    def predict_interactive(self, ml_backend_id: int, task_id: int, context: dict) -> dict:
        """Label Studio's own interactive endpoint (what the editor calls on a smart click): it sends
        the task and `context` to the ML backend. Returns the backend's first result
        ({"result": [...], "score", "model_version"}); raises LabelStudioError on backend errors."""
        raw = self._call("interactive prediction", lambda: self.sdk.ml.with_raw_response.predict_interactive(
            id=ml_backend_id, task=task_id, context=context))
        # The typed call returns None and `.data` is None too: the JSON body is on the raw response.
        try:
            data = raw.response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise LabelStudioError(f"Label Studio {self.url}: interactive prediction gave no answer")
        if data.get("errors"):
            raise LabelStudioError(f"ML backend via Label Studio: {str(data['errors'])[:300]}")
        return data.get("data") or {}

    # ---- export and pull
    def export_snapshot(self, project_id: int, poll_s: float = 0.5, wait_s: float = 600.0) -> list[dict]:
        """All tasks with full annotations and predictions (a snapshot export; the quick export lists
        predictions as ids only)."""
        exp = self._call("create export", lambda: self.sdk.projects.exports.create(
            id=project_id, title=f"sa-engine pull {time.time():.0f}",
            serialization_options={"predictions": {"only_id": False}, "annotations__completed_by": {"only_id": True}}))
        deadline = time.monotonic() + wait_s
        while True:
            state = self._call("poll export", lambda: self.sdk.projects.exports.get(id=project_id, export_pk=exp.id))
            status = str(getattr(state, "status", "")).lower()
            if status.endswith("completed"):
                break
            if status.endswith("failed"):
                raise LabelStudioError(f"Label Studio {self.url}: export {exp.id} of project {project_id} failed")
            if time.monotonic() > deadline:
                raise LabelStudioError(f"Label Studio {self.url}: export {exp.id} not ready after {wait_s:.0f} s")
            time.sleep(poll_s)
        data = self._call("download export", lambda: b"".join(self.sdk.projects.exports.download(
            id=project_id, export_pk=exp.id, export_type="JSON")))
        with contextlib.suppress(Exception):
            self.sdk.projects.exports.delete(id=project_id, export_pk=exp.id)
        return json.loads(data)

    def pull(self, project_id: int) -> PullResult:
        """Decode every submitted (not cancelled) annotation's brush regions. Bad regions (empty, wrong
        size, corrupt RLE) are listed in `problems` and skipped; the rest comes back."""
        tasks = self.export_snapshot(project_id)
        emails = self.user_emails()
        return decode_export(tasks, emails)


def _region_mask(region: dict, height: int, width: int):
    """(H, W) bool of a brush region; raises ValueError with a one-line reason."""
    value = region.get("value") or {}
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise ValueError(f"brush region without RLE (format {value.get('format')!r})")
    ow, oh = region.get("original_width"), region.get("original_height")
    if (ow, oh) != (width, height) and ow is not None:
        raise ValueError(f"mask is {ow}x{oh} but the image is {width}x{height}")
    try:
        mask = decode_mask(value["rle"], height, width)
    except BrushRLEError as e:
        raise ValueError(f"corrupt brush RLE: {e}") from None
    if not mask.any():
        raise ValueError("empty brush mask")
    return mask


def decode_export(tasks: list[dict], user_emails: dict[int, str] | None = None) -> PullResult:
    """Export JSON (snapshot, full predictions) -> PullResult. Pure: no server calls."""
    user_emails = user_emails or {}
    annotations, problems, task_ids = [], [], []
    for task in tasks:
        data = task.get("data") or {}
        tid = int(task["id"])
        task_ids.append(tid)
        image_id, height, width = data.get("image_id"), data.get("height"), data.get("width")
        if image_id is None or height is None or width is None:
            problems.append((f"task {tid}", "task data lacks image_id/height/width (not imported by sa-engine)"))
            continue
        height, width = int(height), int(width)
        # Prediction regions by id, decoded lazily (only when an annotation refers to them).
        pred_regions: dict[str, tuple[int, dict]] = {}
        for pred in task.get("predictions") or []:
            if not isinstance(pred, dict):
                continue
            for r in pred.get("result") or []:
                if r.get("type") == "brushlabels" and r.get("id"):
                    pred_regions[r["id"]] = (int(pred["id"]), r)
        for ann in task.get("annotations") or []:
            aid = int(ann["id"])
            if ann.get("was_cancelled"):
                continue
            by = ann.get("completed_by")
            uid = by.get("id") if isinstance(by, dict) else by
            annotator = (by.get("email") if isinstance(by, dict) else None) or user_emails.get(uid) or f"user-{uid}"
            regions = []
            # per-region choices share the region's id: the regions the annotator marked "unsure"
            unsure = {str(r.get("id")) for r in ann.get("result") or []
                      if r.get("type") == "choices" and r.get("from_name") == UNSURE_TAG
                      and UNSURE_TAG in ((r.get("value") or {}).get("choices") or [])}
            for r in ann.get("result") or []:
                if r.get("type") != "brushlabels":
                    continue
                rid = str(r.get("id") or "")
                thing = f"task {tid} annotation {aid} region {rid}"
                try:
                    mask = _region_mask(r, height, width)
                except ValueError as e:
                    problems.append((thing, str(e)))
                    continue
                pred_id = pred_rid = pred_mask = None
                if rid in pred_regions:
                    pred_id, pred_r = pred_regions[rid]
                    pred_rid = rid
                    with contextlib.suppress(ValueError):
                        pred_mask = _region_mask(pred_r, height, width)
                labels = (r.get("value") or {}).get("brushlabels") or [OBJECT_LABEL]
                regions.append(PulledRegion(region_id=rid, label=labels[0], mask=mask, prediction_id=pred_id,
                                            prediction_region_id=pred_rid, prediction_mask=pred_mask,
                                            meta=r.get("meta") if isinstance(r.get("meta"), dict) else {},
                                            unsure=rid in unsure))
            annotations.append(PulledAnnotation(
                task_id=tid, annotation_id=aid, image_id=image_id, height=height, width=width,
                annotator=annotator, lead_time_s=ann.get("lead_time"), updated_at=ann.get("updated_at"),
                regions=regions))
    return PullResult(annotations=annotations, problems=problems, task_ids=task_ids)
