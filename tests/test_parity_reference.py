"""Parity with Meta's segment-anything: the same small ViT SAM, loaded from a Meta-layout .pth through our
loader, gives the same low-res logits, masks and IoU predictions for the same image and prompts.

Tolerance: logits and IoU predictions within 1e-4 absolute (float32, different op order in the two
implementations); binary masks agree on >= 99.9% of pixels (only pixels whose logit is ~0 may flip).
The image is already at the model's input size, so no resize happens (Meta resizes with PIL, we with
torch; those differ by rounding, which is not what this test is about); padding is exercised.
"""
from functools import partial

import numpy as np
import pytest
import torch

from model.checkpoints import CheckpointError
from model.segmenter import Segmenter
from tests.sam_reference_shim import import_segment_anything

torch.set_num_threads(1)


def build_reference_sam(seed: int = 0):
    """A small ViT SAM made with Meta's own modeling classes (img 256, patch 4 -> a 64x64 grid, like SAM's)."""
    sa = import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    dim = 32
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=256, patch_size=4, in_chans=3, embed_dim=dim, depth=2, num_heads=2,
                                      mlp_ratio=4, out_chans=dim, qkv_bias=True,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=8, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=dim,
                                 mlp_dim=64, num_heads=8), transformer_dim=dim, iou_head_depth=3,
                                 iou_head_hidden_dim=64),
    )
    with torch.no_grad():  # move every weight off its init (zeros/ones) so nothing matches by accident
        for p in sam.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sa, sam.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    sa, sam = build_reference_sam()
    path = tmp_path_factory.mktemp("meta") / "sam_small.pth"
    torch.save(sam.state_dict(), path)
    ours = Segmenter.load(path)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:192, :256]
    img = np.stack([(xx * 0.9) % 255, (yy * 1.3) % 255, rng.integers(0, 255, (192, 256))], -1).astype(np.uint8)
    img[60:130, 80:200] = (200, 40, 40)
    predictor = sa.SamPredictor(sam)
    predictor.set_image(img)
    return sam, predictor, ours, ours.embed([img])[0], path


def test_embeddings_match(pair):
    _, predictor, _, emb, _ = pair
    ref = predictor.get_image_embedding()[0]
    assert ref.shape == emb.features.shape
    assert torch.allclose(ref, emb.features, atol=1e-4)


@pytest.mark.parametrize("multimask", [True, False])
def test_points_boxes_and_mask_prompts_match(pair, multimask):
    _, predictor, ours, emb, _ = pair
    pts = np.array([[120.0, 90.0], [30.0, 150.0]])
    lab = np.array([1, 0])
    box = np.array([70.0, 50.0, 210.0, 140.0])
    cases = [dict(point_coords=pts, point_labels=lab), dict(box=box),
             dict(point_coords=pts[:1], point_labels=lab[:1], box=box)]
    for case in cases:
        m_ref, iou_ref, low_ref = predictor.predict(multimask_output=multimask, return_logits=True, **case)
        kw = {}
        if "point_coords" in case:
            kw.update(points=case["point_coords"][None], labels=case["point_labels"][None])
        if "box" in case:
            kw.update(boxes=case["box"][None])
        p = ours.predict(emb, multimask=multimask, **kw)
        assert np.allclose(iou_ref, p.iou_pred[0].numpy(), atol=1e-4), case
        assert np.allclose(low_ref, p.low_res_logits[0].numpy(), atol=1e-4), case
        agree = ((m_ref > 0) == p.masks[0].numpy()).mean()
        assert agree >= 0.999, (case, agree)
        up = ours.upsample_logits(p.low_res_logits[0], emb).numpy()
        assert np.allclose(up, m_ref, atol=1e-3), case
        # feed the logits back as a mask prompt
        m2, iou2, _ = predictor.predict(multimask_output=multimask, return_logits=True,
                                        mask_input=low_ref[:1], **case)
        p2 = ours.predict(emb, mask_input=p.low_res_logits[:, :1], multimask=multimask, **kw)
        assert np.allclose(iou2, p2.iou_pred[0].numpy(), atol=1e-4), case


def test_batched_prompts_match(pair):
    _, predictor, ours, emb, _ = pair
    pts = torch.tensor([[[20.0, 20.0]], [[200.0, 100.0]], [[128.0, 64.0]]])
    lab = torch.ones(3, 1, dtype=torch.int64)
    tp = predictor.transform.apply_coords_torch(pts, predictor.original_size)
    m_ref, iou_ref, low_ref = predictor.predict_torch(tp, lab, multimask_output=True, return_logits=True)
    p = ours.predict(emb, pts.numpy(), lab.numpy())
    assert torch.allclose(iou_ref, p.iou_pred, atol=1e-4)
    assert torch.allclose(low_ref, p.low_res_logits, atol=1e-4)


def test_mismatched_pth_lists_what_is_wrong(pair, tmp_path):
    sam, *_ = pair
    state = dict(sam.state_dict())
    state.pop("mask_decoder.iou_token.weight")
    state["mask_decoder.extra.weight"] = torch.zeros(3)
    state["mask_decoder.mask_tokens.weight"] = torch.zeros(5, 32)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        Segmenter.load(tmp_path / "broken.pth")
    msg = str(e.value)
    assert "\n" not in msg and "broken.pth" in msg
    assert "missing: mask_decoder.iou_token.weight" in msg
    assert "unexpected: mask_decoder.extra.weight" in msg
    assert "mask_decoder.mask_tokens.weight (5, 32) vs model (4, 32)" in msg


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "obj": object()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        Segmenter.load(tmp_path / "evil.pth")


def test_our_checkpoint_of_a_loaded_vit_roundtrips(pair, tmp_path):
    _, _, ours, emb, _ = pair
    ours.save(tmp_path / "ck", {"round": 0})
    back = Segmenter.load(tmp_path / "ck")
    a = ours.predict(emb, boxes=np.array([[10.0, 10.0, 100.0, 100.0]]))
    b = back.predict(emb, boxes=np.array([[10.0, 10.0, 100.0, 100.0]]))
    assert torch.allclose(a.low_res_logits, b.low_res_logits, atol=1e-5)
