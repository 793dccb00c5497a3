"""Choosing the next round's images: "uncertain" takes the images the current model is least sure of.

Two promises, each watched failing with a breakage in a scratch copy: the doubt score is higher for answers
whose area moves with the threshold than for crisp ones (breakage: the stability term's sign flipped); the
selection takes the highest-scored images, never one already annotated, and sets an unreadable one aside with
a line (breakage: the ranking reversed).
"""
from __future__ import annotations

import numpy as np
import torch
import yaml
from PIL import Image

from engine import round_steps
from engine.integrations.config import load_config
from engine.rounds import default_list_images, default_select
from model.segmenter import Prediction
from model.uncertainty import image_uncertainty

torch.set_num_threads(1)


class _Answers:
    """Gives the same three low-res logit maps (3, 256, 256) and predicted IoUs (3,) to every point prompt: what
    the model 'answers', set by the test (the uncertainty arithmetic is under test, not a network)."""

    def __init__(self, logits: np.ndarray, iou: np.ndarray):
        self.logits, self.iou = torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(iou)

    def embed(self, images):
        class _Emb:
            original_size = images[0].shape[:2]
        return [_Emb()]

    def predict(self, emb, points=None, labels=None, multimask=True, upsample=False):
        n = len(points)
        return Prediction(None, self.iou[None].expand(n, 3).clone(), self.logits[None].expand(n, 3, 256, 256).clone())


def _disc(radius: float, edge: float) -> np.ndarray:
    """Logits of a disc: +edge inside, -edge outside, a linear ramp of 4 px across the rim."""
    yy, xx = np.mgrid[0:256, 0:256]
    d = radius - np.hypot(yy - 128, xx - 128)
    return np.clip(d / 4.0, -1, 1) * edge


def test_doubt_is_higher_for_answers_that_move_with_the_threshold():
    image = np.zeros((64, 64, 3), np.uint8)
    crisp = _Answers(np.stack([_disc(40, 20.0)] * 3), np.array([0.9, 0.8, 0.7]))
    soft = _Answers(np.stack([_disc(40, 1.5)] * 3), np.array([0.9, 0.8, 0.7]))
    a, b = image_uncertainty(crisp, image), image_uncertainty(soft, image)
    for u in (a, b):
        assert set(u) == {"score", "low_confidence", "instability", "disagreement"}
        assert all(0.0 <= v <= 1.0 for v in u.values())
        assert u["disagreement"] == 0.0 and u["low_confidence"] == np.float32(1 - 0.9)
    assert a["score"] == a["instability"] < 0.05 and b["score"] > 0.2
    crossing = _Answers(np.stack([_disc(40, 20.0), np.roll(_disc(40, 20.0), 60, axis=1), _disc(20, 20.0)]),
                        np.array([0.9, 0.8, 0.7]))
    assert image_uncertainty(crossing, image)["disagreement"] > 0.5


def test_uncertain_selection_takes_the_images_the_model_is_least_sure_of(fitted_compact, tmp_path, monkeypatch):
    seg, _ = fitted_compact
    checkpoint = tmp_path / "model"
    seg.save(checkpoint, {})
    folder = tmp_path / "images"
    folder.mkdir()
    for level in range(6):  # image k's doubt is set to k/10 below: its brightness
        Image.fromarray(np.full((32, 32, 3), level * 10, np.uint8)).save(folder / f"img-{level}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    monkeypatch.setattr(round_steps, "image_uncertainty", lambda segmenter, pixels: {"score": pixels.mean() / 100})
    (tmp_path / "engine.yaml").write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "run"), "images": {"source": str(folder)},
        "stages": {"select": "uncertain", "select_pool": 64}}))
    cfg = load_config(tmp_path / "engine.yaml")
    candidates = default_list_images(cfg)
    lines: list[str] = []
    chosen = default_select(cfg, 1, str(checkpoint), candidates, {"img-5.png"}, 3, lines.append)
    assert chosen["image_ids"] == ["img-2.png", "img-3.png", "img-4.png"]  # img-5 was annotated already
    assert chosen["scored"] == 5 and chosen["uncertainty"]["img-4.png"] == 0.4
    assert any("broken.png" in line and "left out" in line for line in lines)

    cfg.stages.select = "random"
    random = default_select(cfg, 1, str(checkpoint), candidates, set(), 3)
    assert len(random["image_ids"]) == 3 and "uncertainty" not in random
