import json

import numpy as np
import pytest
import torch

from model.segmenter import CheckpointError, ImageEmbedding, PromptError, Segmenter

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def seg():
    return Segmenter.new("compact", seed=0)


@pytest.fixture(scope="module")
def emb(seg):
    img = np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8)
    return seg.embed([img])[0]


def test_embed_and_predict_shapes(seg, emb):
    assert isinstance(emb, ImageEmbedding)
    assert emb.original_size == (90, 140) and emb.input_size == (82, 128)
    pts = np.array([[[10, 20]], [[100, 80]]], float)
    p = seg.predict(emb, pts, np.ones((2, 1)))
    assert p.masks.shape == (2, 3, 90, 140) and p.masks.dtype == torch.bool
    assert p.iou_pred.shape == (2, 3) and p.low_res_logits.shape == (2, 3, 256, 256)
    p1 = seg.predict(emb, boxes=np.array([[5, 5, 60, 70.0]]), multimask=False)
    assert p1.masks.shape == (1, 1, 90, 140)
    # the low-res logits upsampled by upsample_logits give the same masks as predict
    up = seg.upsample_logits(p.low_res_logits[:, 0], emb)
    assert up.shape == (2, 90, 140)
    assert ((up > 0) == p.masks[:, 0]).float().mean() > 0.99
    # feeding the logits back as a mask prompt works
    p2 = seg.predict(emb, pts, np.ones((2, 1)), mask_input=p.low_res_logits[:, :1])
    assert p2.masks.shape == (2, 3, 90, 140)


def test_prompts_are_batched_consistently(seg, emb):
    pts = np.array([[[10, 20], [50, 40]], [[100, 80], [0, 0]]], float)
    lab = np.array([[1, 0], [1, -1]])
    both = seg.predict(emb, pts, lab, upsample=False)
    one = seg.predict(emb, pts[1:], lab[1:], upsample=False)
    assert torch.allclose(both.iou_pred[1], one.iou_pred[0], atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "none given"),
    (dict(points=np.zeros((0, 1, 2)), labels=np.zeros((0, 1))), "empty"),
    (dict(points=np.array([[[500.0, 10.0]]]), labels=np.ones((1, 1))), "outside"),
    (dict(points=np.array([[[np.nan, 10.0]]]), labels=np.ones((1, 1))), "NaN"),
    (dict(points=np.array([[10.0, 10.0]]), labels=np.ones((1, 1))), "shape"),
    (dict(points=np.array([[[10.0, 10.0]]])), "required"),
    (dict(points=np.array([[[10.0, 10.0]]]), labels=np.full((1, 1), 3)), "must be"),
    (dict(points=np.array([[["a", "b"]]]), labels=np.ones((1, 1))), "dtype"),
    (dict(boxes=np.array([[0, 0, 10, np.inf]])), "NaN or inf"),
    (dict(boxes=np.array([[10, 0, 5, 5.0]])), "XYXY"),
    (dict(boxes=np.array([[0, 0, 10, 500.0]])), "outside"),
    (dict(boxes=np.zeros((2, 4)), points=np.zeros((1, 1, 2)), labels=np.ones((1, 1))), "boxes"),
    (dict(mask_input=np.zeros((1, 1, 64, 64))), "mask_input"),
])
def test_bad_prompts_raise_one_line_prompt_errors(seg, emb, kwargs, match):
    with pytest.raises(PromptError, match=match) as e:
        seg.predict(emb, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("image, match", [
    (np.zeros((10, 10), np.uint8), "shape"),
    (np.zeros((10, 10, 3), np.float32), "uint8"),
    (np.zeros((10, 10, 4), np.uint8), "shape"),
    ([[1, 2, 3]], "numpy"),
])
def test_bad_images_raise(seg, image, match):
    with pytest.raises(PromptError, match=match):
        seg.embed([image])


def test_save_load_roundtrip(tmp_path, seg, emb):
    v = seg.save(tmp_path / "ck", {"round": 3, "data_fingerprint": "abc", "metrics": {"miou": 0.5}})
    back = Segmenter.load(tmp_path / "ck")
    assert back.model_version == v and back.metadata["round"] == 3
    pts = np.array([[[30, 40]]], float)
    a = seg.predict(emb, pts, np.ones((1, 1)))
    b = back.predict(emb, pts, np.ones((1, 1)))
    assert torch.allclose(a.low_res_logits, b.low_res_logits, atol=1e-5)


def test_missing_and_mismatched_checkpoints(tmp_path, seg):
    with pytest.raises(CheckpointError, match="not found"):
        Segmenter.load(tmp_path / "nope")
    seg.save(tmp_path / "small")
    other = Segmenter.new("compact", prompt_dim=32)
    other.save(tmp_path / "other")
    # weights of one architecture under the config of another: shapes are listed
    (tmp_path / "small" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="sha256 does not match"):  # the config's digest of its weights
        Segmenter.load(tmp_path / "small")
    config = tmp_path / "small" / "sa_engine.json"
    doc = json.loads(config.read_text())
    del doc["weights_sha256"]  # a hand-made (or pre-digest) checkpoint: the architecture check still speaks
    config.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        Segmenter.load(tmp_path / "small")
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        Segmenter.load(bad)


def test_fresh_compact_model_ties_cross_attention_query_and_key():
    from model.segmenter import localising_init

    seg = Segmenter.new("compact", seed=0)
    plain = Segmenter.new("compact", seed=0, attn_init=0)
    attn = seg.net.mask_decoder.transformer.layers[0].cross_attn_image_to_token
    ref = plain.net.mask_decoder.transformer.layers[0].cross_attn_image_to_token
    assert torch.equal(attn.q_proj.weight, attn.k_proj.weight)
    assert torch.allclose(attn.q_proj.weight, 2.5 * ref.q_proj.weight)
    assert seg.arch == plain.arch  # an init, not an architecture: checkpoints stay interchangeable
    # The tied projections make an image token's attention to a point token peak near the click.
    net = plain.net
    localising_init(net, 2.5)
    with torch.no_grad():
        pe = net.dense_pe()[0].flatten(1).T  # (h*w, C) image-grid encodings
        click = torch.tensor([[[40.0, 72.0]]])
        pt = net.prompt_encoder.shared_embedding(click / net.image_size)[0, 0]  # (C,)
        a = net.mask_decoder.transformer.layers[0].cross_attn_image_to_token
        score = a.q_proj(pe) @ a.k_proj(pt)
    n = net.embed_size
    y, x = divmod(int(score.argmax()), n)
    cell = net.image_size / n
    assert abs((x + 0.5) * cell - 40) <= cell and abs((y + 0.5) * cell - 72) <= cell
