"""The whole people path, as a team without ground truth runs it: `sa-engine run` with `stages.simulate: false`
on the managed Label Studio, and people answering it — a person in a real browser (Playwright + Chromium) for
one task of the manual round, the rest annotated through the API while the run waits. The run carves its
holdout, waits for it to be drawn, runs one manual round, pulls it, retrains, promotes or keeps by the holdout,
and runs the automatic stage; the ML backend service it starts serves every project and follows the promoted
model without a restart."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.browser_person import click_object_and_submit, find_browser

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.labelstudio
@pytest.mark.ray
def test_the_people_path_from_holdout_to_automatic_stage_with_a_person_in_the_browser(tmp_path):
    from engine.integrations import labelling, runtime
    from engine.integrations.config import load_config
    from engine.integrations.labelstudio import free_port, stop_server
    from engine.integrations.synth import write_synthetic_dataset

    executable = find_browser()
    write_synthetic_dataset(tmp_path / "data", n_images=6, seed=4, size=128)
    data = {
        "workdir": str(tmp_path / "run"),
        "images": {"source": str(tmp_path / "data" / "images"),
                   # read by the test's stand-in people only: the run itself has no ground truth
                   "ground_truth": str(tmp_path / "data" / "annotations.json"),
                   "holdout_from_source": 2, "holdout_source": None, "holdout_ground_truth": None},
        "storage": {"root": str(tmp_path / "store")},
        "simulate": {"max_clicks": 3},
        "stages": {"simulate": False,
                   "manual": {"rounds": 1, "images_per_round": 2},
                   "semi": {"rounds": 0},
                   "auto": {"points_per_side": 8, "num_actors": 1, "pred_iou_thresh": 0.0,
                            "stability_score_thresh": 0.0, "min_mask_region_area": 0, "max_mask_fraction": 1.0}},
        # SA_ENGINE_TEST_LS_DATABASE=postgresql runs the whole path on Label Studio with PostgreSQL
        "labelstudio": {"managed": True, "port": free_port(), "ml_backend_port": free_port(),
                        "database": os.environ.get("SA_ENGINE_TEST_LS_DATABASE", "sqlite")},
        "ray": {"num_cpus": 2},
        # A briefly bootstrapped model (60 steps on other synthetic shapes), retrained on the round's masks: the
        # holdout's 1-click mIoU says whether it is better (promoted or kept, both are checked below). Steps, not
        # seconds, bound both; 60 retraining steps keep this test, the suite's longest, near 3 minutes idle.
        "model": {"bootstrap_steps": 60, "bootstrap_images": 8},
        "train": {"steps": 60},
        "eval": {"promote_confidence": 0.0},
    }
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    shots = Path(os.environ.get("SA_ENGINE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    log = open(tmp_path / "run.log", "w")
    run = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(path)], cwd=REPO,
                           stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        people = _People(cfg, executable, shots, run, tmp_path / "run.log")
        people.draw_the_holdout()
        clicked = people.draw_round_one()
        assert run.wait(timeout=900) in (0, 3), (tmp_path / "run.log").read_text()[-3000:]
        people.check_after_the_run(clicked)
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
        labelling.stop_ml_backend_service(cfg)
        stop_server(runtime.server_settings(cfg).data_dir)


class _People:
    """What the people do while `sa-engine run` waits for them, and what they find afterwards."""

    def __init__(self, cfg, executable: str, shots: Path, run: subprocess.Popen, log: Path):
        from engine.integrations import runtime

        self.cfg, self.executable, self.shots, self.run, self.log = cfg, executable, shots, run, log
        self.token = runtime.ml_backend_token(cfg)
        self.service_pid: int | None = None

    def _project(self, purpose: str, round: int, wait_s: float = 400.0) -> tuple[object, int]:
        """Wait until the run has published the project (all its tasks imported); the client and its id."""
        from engine.integrations import labelling
        from engine.integrations.labelstudio import LabelStudio

        title = labelling.project_title(self.cfg, purpose, round)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            assert self.run.poll() is None, self.log.read_text()[-3000:]
            if "waiting for annotations" in self.log.read_text():  # published, tasks imported, backend up
                ls = LabelStudio(self._server()["url"], self._credentials()["token"])
                project_id = ls.find_project(title)
                if project_id is not None and f"project {project_id} at" in self.log.read_text():
                    return ls, project_id
            time.sleep(2.0)
        raise AssertionError(f"no project {title!r} within {wait_s:.0f} s:\n{self.log.read_text()[-3000:]}")

    def _server(self) -> dict:
        return json.loads((Path(self.cfg.path("labelstudio")) / "server.json").read_text())

    def _credentials(self) -> dict:
        return json.loads((Path(self.cfg.path("labelstudio")) / "credentials.json").read_text())

    def _service(self) -> dict:
        from engine.integrations import labelling

        health = labelling.backend_health(labelling.service_url(self.cfg), self.token)
        assert health is not None, "the ML backend service is not answering"
        pid = json.loads(labelling.service_file(self.cfg).read_text())["pid"]
        if self.service_pid is None:
            self.service_pid = pid
        assert pid == self.service_pid, "the ML backend service was restarted"
        return health

    def draw_the_holdout(self) -> None:
        """The holdout project ("holdout r0 …"), drawn through the API with the ML backend service."""
        from engine.integrations import labelling

        _, project_id = self._project("holdout", 0)
        self._service()
        summary = labelling.annotate_project(self.cfg, project_id, runtime_checkpoint(self.cfg), "holdout-drawer")
        assert summary["images"] == 2 and summary["masks"] > 0

    def draw_round_one(self) -> dict:
        """Round 1: one task by a person in the browser (one click on the largest object, submit), the other
        through the API. Returns what the person did."""
        from engine.integrations import labelling, runtime
        from storage.coco import load_ground_truth
        from engine.integrations.ml_backend import MaskPredictor, Prompt
        from model.clicks import first_click
        from model.segmenter import Segmenter

        ls, project_id = self._project("manual", 1)
        before = self._service()
        tasks = {t.data["image_id"]: int(t.id) for t in ls.tasks(project_id)}
        image_id = sorted(tasks)[0]
        # The person clicks the largest object the model answers for (an empty answer makes an empty brush region,
        # which the pull sets aside: tests/test_labelstudio_pull.py)
        objects = [o for o in load_ground_truth(self.cfg.images.ground_truth)[image_id] if o.parent_id is None]
        source = runtime.image_source(self.cfg)
        predictor = MaskPredictor(Segmenter.load(runtime.current_model(self.cfg)))
        pixels = source.load(source.ref(image_id)).pixels

        def answer(o) -> int:
            x, y = first_click(o.mask)
            return int(predictor.predict(image_id, lambda: pixels, Prompt(np.array([[x + 0.5, y + 0.5]]),
                                                                          np.array([1]), None))[0].sum())
        target = max((o for o in objects if answer(o) > 0), key=lambda o: int(o.mask.sum()))
        x, y = first_click(target.mask)
        h, w = target.mask.shape
        username, password = self.cfg.labelstudio.username, self._credentials()["password"]
        click_object_and_submit(self.executable, ls.url, username, password, project_id,
                                tasks[image_id], (x, y), (h, w),
                                lambda: self._service()["predictions"] > before["predictions"], self.shots)
        assert tasks[image_id] in ls.annotated_task_ids(project_id), "the person's submit did not arrive"
        summary = labelling.annotate_project(self.cfg, project_id, runtime_checkpoint(self.cfg), "api-annotator")
        assert summary["images"] == 1
        return {"image_id": image_id, "task_id": tasks[image_id], "click": (x, y), "project_id": project_id,
                "username": username, "model_version": before["model_version"]}

    def check_after_the_run(self, clicked: dict) -> None:
        from engine.integrations import runtime
        from engine.integrations.ml_backend import MaskPredictor, Prompt
        from engine.rounds import LEDGER_FILE, Ledger
        from model.iou import mask_iou
        from model.segmenter import Segmenter
        from storage.rle import decode_rles

        cfg = self.cfg
        ledger = Ledger(Path(cfg.workdir) / LEDGER_FILE)
        assert [e["step"] for e in ledger.entries()] == [
            "r0.init", "r0.bootstrap", "r0.general", "r0.holdout", "r0.eval", "r1.select", "r1.manual", "r1.train",
            "r1.eval", "r1.promote",
            "r2.select", "r2.auto"]
        held = set(ledger.get("r0.holdout")["inputs"]["image_ids"])
        assert ledger.get("r0.holdout")["outputs"]["masks"] > 0

        # The person's mask is in the store with its lineage, and it is the model's answer to that click (where
        # the page put it: within 1.5 px of the pixel's centre, as tests/test_browser.py checks in-process)
        store = runtime.mask_store(cfg)
        [rec] = [r for r in store.iter_records(image_ids=[clicked["image_id"]]) if r.stage == "manual"]
        assert rec.annotator == clicked["username"] and rec.source["ls_task"] == clicked["task_id"]
        assert rec.model_version == clicked["model_version"] and rec.verified
        source = runtime.image_source(cfg)
        predictor = MaskPredictor(Segmenter.load(ledger.get("r1.manual")["inputs"]["checkpoint"]))
        pixels = source.load(source.ref(clicked["image_id"])).pixels
        x, y = clicked["click"]
        person = decode_rles([rec.rle])[0]
        best = max(float(mask_iou(person, predictor.predict(clicked["image_id"], lambda: pixels, Prompt(
            np.array([[x + 0.5 + dx, y + 0.5 + dy]]), np.array([1]), None))[0]))
            for dx in np.arange(-1.5, 1.51, 0.25) for dy in np.arange(-1.5, 1.51, 0.25))
        assert best == 1.0, best
        assert not held & {r.image_id for r in store.iter_records()}  # never annotated in a round

        # Promoted or kept by the holdout; the service (same process) serves the model in use, switched live
        decision = ledger.get("r1.promote")["outputs"]
        in_use = Segmenter.load(runtime.current_model(cfg)).model_version
        deadline = time.monotonic() + 30
        while self._service()["model_version"] != in_use and time.monotonic() < deadline:
            time.sleep(1.0)
        assert self._service()["model_version"] == in_use
        assert (in_use != clicked["model_version"]) == decision["promoted"], decision

        # The automatic stage ran on the images no one annotated
        auto = ledger.get("r2.auto")
        assert set(auto["inputs"]["image_ids"]) == {r.image_id for r in source.list()} - held - set(
            ledger.get("r1.select")["outputs"]["image_ids"])
        assert auto["outputs"]["images"] == 2


def runtime_checkpoint(cfg) -> str | None:
    """The model in use, as the run recorded it (what the service serves)."""
    from engine.integrations import runtime

    return runtime.current_model(cfg)
