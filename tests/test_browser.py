"""A person's path through the real Label Studio page, in a real browser (Playwright driving Debian's Chromium):
log in, open a task of a manual round, switch on Auto-Annotation, pick the Auto-Detect point tool, click an
object, get the brush mask from our ML backend, submit — and the engine's pull finds that annotation, by that
person, with the model's mask. `./dev.sh test` installs the browser where it can (root + apt); elsewhere the test
skips and says why. SA_ENGINE_SCREENSHOTS=DIR keeps the screenshots (docs/people.md uses them)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.browser_person import click_object_and_submit, find_browser


@pytest.mark.labelstudio
@pytest.mark.slow
def test_a_person_clicks_an_object_in_the_browser_and_the_pull_finds_it(tmp_path):
    """The managed server of a work dir (it serves the work dir's images to the page), as `sa-engine stage manual
    --people` starts it."""
    from engine.integrations import runtime
    from engine.integrations.config import load_config
    from engine.integrations.labelstudio import free_port, stop_server
    from engine.integrations.synth import write_synthetic_dataset

    executable = find_browser()
    shots = Path(os.environ.get("SA_ENGINE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    write_synthetic_dataset(tmp_path / "data", n_images=1, seed=3, size=256)
    cfg = load_config(None, {"workdir": str(tmp_path / "run"), "images.source": str(tmp_path / "data" / "images"),
                             "images.ground_truth": str(tmp_path / "data" / "annotations.json"),
                             "labelstudio.port": free_port(), "labelstudio.ml_backend_port": free_port()})
    try:
        _person_clicks(cfg, executable, shots)
    finally:
        stop_server(runtime.server_settings(cfg).data_dir)


def _person_clicks(cfg, executable: str, shots: Path) -> None:
    from engine.integrations import labelling, runtime
    from storage.coco import load_ground_truth
    from model.clicks import first_click
    from model.iou import mask_iou

    ls, server = labelling.connect(cfg)
    source = runtime.image_source(cfg)
    images, _, _ = labelling.task_images(cfg, source, [r.image_id for r in source.list()], None, "manual")
    project_id, tasks = labelling.publish(ls, cfg, labelling.project_title(cfg, "manual", 1), "browser test", images)
    [(image_id, task_id)] = tasks.items()
    objects = [o for o in load_ground_truth(cfg.images.ground_truth)[image_id] if o.parent_id is None]
    target = max(objects, key=lambda o: int(o.mask.sum()))
    x, y = first_click(target.mask)
    h, w = target.mask.shape
    password = json.loads((Path(server.data_dir) / "credentials.json").read_text())["password"]

    # (SA_ENGINE_BROWSER_CHECKPOINT: a trained model, for screenshots that show a real object's mask)
    segmenter = runtime.segmenter(cfg, os.environ.get("SA_ENGINE_BROWSER_CHECKPOINT"))
    with labelling.start_ml_backend(cfg, segmenter, source, ls.url) as backend:
        labelling.connect_backend(ls, project_id, backend)
        click_object_and_submit(executable, ls.url, server.username, password, project_id, task_id, (x, y), (h, w),
                                lambda: backend.state.predictions >= 1, shots)

    # The engine's pull finds the person's annotation, with the model's mask for that click
    pull = ls.pull(project_id)
    [annotation] = [a for a in pull.annotations if a.task_id == task_id]
    assert annotation.annotator == server.username
    [region] = [r for r in annotation.regions if r.label == "object"]
    assert region.mask.shape == (h, w) and region.mask.any()
    # The click the backend received is the one made on the object, and the region is the backend's answer
    predictor = backend.state.predictor
    [(key, low)] = [(k, v) for k, v in predictor._logits.items() if k[1] == image_id]
    [(px, py, label)] = key[3]
    assert label == 1 and abs(px - (x + 0.5)) <= 1.5 and abs(py - (y + 0.5)) <= 1.5
    emb = predictor.cache.get(image_id, lambda: source.load(source.ref(image_id)).pixels)
    answer = (segmenter.upsample_logits(torch.as_tensor(low)[None], emb)[0] > 0).numpy()
    assert float(mask_iou(region.mask, answer)) == 1.0
