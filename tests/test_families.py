"""The SAM family beyond SAM 1: parity with the reference implementations on the same weights.

- SAM 2 / 2.1: Meta's `sam2` package (its predictor and its automatic generator) against a Meta `.pt` loaded
  through our loader: a small Hiera named by a Meta yaml beside it, and Meta's tiny preset inferred from shapes.
- SAM-HQ: Meta's `segment-anything-hq` against a Meta-layout `.pth`.
- transformers directories (sam2, sam_hq, sam3_tracker): the same model's own forward pass.
Tolerances as SAM 1's (tests/test_parity_reference.py): logits and IoU predictions within 1e-4, masks agree on
>= 99.9 % of pixels.
"""
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoints import CheckpointError
from model.segmenter import ImageEmbedding, Segmenter
from tests.sam_reference_shim import import_reference

torch.set_num_threads(1)

SMALL_HIERA = dict(embed_dim=16, num_heads=1, stages=[1, 1, 2, 1], global_att_blocks=[3], window_spec=[8, 4, 4, 2])


def _perturb(model, seed: int = 0, scale: float = 0.05):
    """Move every weight off its init (zeros / ones) so nothing agrees by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def make_image(h: int = 1024, w: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([(xx * 0.9) % 255, (yy * 1.3) % 255, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
    img[h // 4:h // 2, w // 3:2 * w // 3] = (200, 40, 40)
    img[2 * h // 3:5 * h // 6, w // 8:w // 3] = (30, 160, 60)
    return img


def meta_sam2(trunk: dict | None = None, seed: int = 0):
    """A SAM 2.1 model in Meta's classes (sam2.1_hiera_t.yaml, trunk overridden when given), perturbed."""
    import_reference("sam2")
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    overrides = []
    if trunk:
        dims = [trunk["embed_dim"] * 2 ** i for i in range(len(trunk["stages"]))]
        overrides = [f"++model.image_encoder.trunk.{k}={v}".replace(" ", "") for k, v in trunk.items()]
        overrides.append(f"++model.image_encoder.neck.backbone_channel_list={dims[::-1]}".replace(" ", ""))
        overrides.append("++model.image_encoder.neck.d_model=64")  # the decoder's width (Meta's: 256)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", mode="eval",
                       hydra_overrides_extra=overrides)
    return _perturb(model, seed)


def save_meta_sam2(model, path, trunk: dict | None = None):
    """Meta's checkpoint layout ({"model": state}); with `trunk`, Meta's yaml beside it names the size."""
    torch.save({"model": model.state_dict()}, path)
    if trunk:
        lines = ["model:", "  image_size: 1024", "  image_encoder:", "    trunk:"]
        lines += [f"      {k}: {list(v) if isinstance(v, (list, tuple)) else v}" for k, v in trunk.items()]
        path.with_suffix(".yaml").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sam2_pair(tmp_path_factory):
    import_reference("sam2")
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    meta = meta_sam2(SMALL_HIERA)
    path = save_meta_sam2(meta, tmp_path_factory.mktemp("sam2") / "sam2_small.pt", SMALL_HIERA)
    ours = Segmenter.load(path)
    img = make_image(600, 800)
    predictor = SAM2ImagePredictor(meta)
    predictor.set_image(img)
    return meta, predictor, ours, ours.embed([img])[0], img


def test_sam2_loads_named_by_its_yaml(sam2_pair):
    _, _, ours, _, _ = sam2_pair
    assert ours.family == "sam2" and ours.net.resize == "squash"
    assert ours.arch["trunk"]["window_spec"] == SMALL_HIERA["window_spec"]
    assert ours.model_version.startswith("sam2-named-")


def test_sam2_embeddings_match(sam2_pair):
    _, predictor, _, emb, _ = sam2_pair
    ref = predictor._features
    assert torch.allclose(ref["image_embed"][0], emb.features, atol=1e-4)
    for r, e in zip(ref["high_res_feats"], emb.extras):
        assert r[0].shape == e.shape
        assert torch.allclose(r[0], e, atol=1e-4)


def _compare(ours_pred, m_ref, iou_ref, low_ref):
    low = ours_pred.low_res_logits[0].numpy()
    assert low.shape == low_ref.shape
    assert np.abs(low - low_ref).max() < 1e-4
    assert np.abs(ours_pred.iou_pred[0].numpy() - iou_ref).max() < 1e-4
    agree = ((m_ref > 0) == ours_pred.masks[0].numpy()).mean()
    assert agree >= 0.999, agree


@pytest.mark.parametrize("multimask", [True, False])
def test_sam2_points_boxes_and_mask_prompts_match(sam2_pair, multimask):
    _, predictor, ours, emb, _ = sam2_pair
    pts, lab = np.array([[420.0, 210.0], [100.0, 520.0]]), np.array([1, 0])
    box = np.array([260.0, 140.0, 540.0, 310.0])
    for case in (dict(point_coords=pts, point_labels=lab), dict(box=box),
                 dict(point_coords=pts[:1], point_labels=lab[:1], box=box)):
        m_ref, iou_ref, low_ref = predictor.predict(multimask_output=multimask, return_logits=True, **case)
        kw = {}
        if "point_coords" in case:
            kw.update(points=case["point_coords"][None], labels=case["point_labels"][None])
        if "box" in case:
            kw.update(boxes=case["box"][None])
        _compare(ours.predict(emb, multimask=multimask, **kw), m_ref, iou_ref, low_ref)
    # a second click with the first answer as the mask prompt (the interactive loop)
    first = ours.predict(emb, points=pts[None, :1], labels=lab[None, :1], multimask=multimask)
    best = int(first.iou_pred[0].argmax())
    prev = first.low_res_logits[:, best:best + 1].numpy()
    m_ref, iou_ref, low_ref = predictor.predict(point_coords=pts, point_labels=lab, mask_input=prev[0],
                                                multimask_output=multimask, return_logits=True)
    _compare(ours.predict(emb, points=pts[None], labels=lab[None], mask_input=prev, multimask=multimask),
             m_ref, iou_ref, low_ref)


def _matched_share(ours: list[np.ndarray], ref: list[np.ndarray], iou: float = 0.9) -> float:
    """Share of `ref` masks that one of `ours` matches at IoU >= iou."""
    if not ref:
        return 1.0 if not ours else 0.0
    a = np.stack([m.ravel() for m in ours]).astype(np.float32) if ours else np.zeros((0, ref[0].size), np.float32)
    b = np.stack([m.ravel() for m in ref]).astype(np.float32)
    inter = b @ a.T
    union = b.sum(1)[:, None] + a.sum(1)[None] - inter
    return float(((inter / np.maximum(union, 1)).max(1) >= iou).mean()) if len(a) else 0.0


@pytest.mark.parametrize("use_m2m", [False, True])
def test_sam2_automatic_generator_agrees_with_meta(sam2_pair, use_m2m):
    """Every candidate of Meta's SAM2AutomaticMaskGenerator (with and without its mask-to-mask refinement) is one
    of ours and back. NMS is set to keep everything: random weights give near-identical masks for every point,
    which NMS would fold into one, and the candidates are what the frame, filters and refinement decide."""
    import_reference("sam2")
    from pycocotools import mask as mask_utils
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from model.amg import generate_masks
    from model.amg_params import AmgParams

    meta, _, ours, _, _ = sam2_pair
    img = make_image(300, 400)
    kw = dict(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.0, stability_score_thresh=0.0,
              box_nms_thresh=1.0, min_mask_region_area=0)
    ref = SAM2AutomaticMaskGenerator(meta, use_m2m=use_m2m, **kw).generate(img)
    mine = generate_masks(ours, img, AmgParams(max_mask_fraction=1.0, use_m2m=use_m2m, **kw))
    ref_masks = [r["segmentation"] for r in ref]
    our_masks = [mask_utils.decode(m.rle).astype(bool) for m in mine]
    assert len(ref_masks) >= 100, "the reference kept too few masks for the comparison to mean anything"
    assert abs(len(our_masks) - len(ref_masks)) <= 0.05 * len(ref_masks)
    assert _matched_share(our_masks, ref_masks) >= 0.95
    assert _matched_share(ref_masks, our_masks) >= 0.95
    ref_iou = np.sort([r["predicted_iou"] for r in ref])
    our_iou = np.sort([m.predicted_iou for m in mine])
    if len(ref_iou) == len(our_iou):
        assert np.abs(ref_iou - our_iou).max() < 1e-4
    # NMS on (Meta's default 0.7): the same survivors
    kw["box_nms_thresh"] = 0.7
    ref = SAM2AutomaticMaskGenerator(meta, use_m2m=use_m2m, **kw).generate(img)
    mine = generate_masks(ours, img, AmgParams(max_mask_fraction=1.0, use_m2m=use_m2m, **kw))
    ref_masks, our_masks = [r["segmentation"] for r in ref], [mask_utils.decode(m.rle).astype(bool) for m in mine]
    assert ref_masks and _matched_share(our_masks, ref_masks) >= 0.95 and _matched_share(ref_masks, our_masks) >= 0.95


def test_sam2_tiny_preset_is_inferred_from_the_weights(tmp_path):
    """Meta's sam2.1 tiny shapes, no yaml: the size comes from the weights; the video memory is left out."""
    import_reference("sam2")
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    meta = meta_sam2()
    ours = Segmenter.load(save_meta_sam2(meta, tmp_path / "sam2.1_hiera_tiny.pt"))
    assert ours.arch["preset"] == "sam2.1-hiera-tiny"
    img = make_image(1024, 1024)
    predictor = SAM2ImagePredictor(meta)
    predictor.set_image(img)
    emb = ours.embed([img])[0]
    assert torch.allclose(predictor._features["image_embed"][0], emb.features, atol=1e-4)
    m_ref, iou_ref, low_ref = predictor.predict(point_coords=np.array([[512.0, 300.0]]), point_labels=np.array([1]),
                                                return_logits=True)
    _compare(ours.predict(emb, points=[[[512.0, 300.0]]], labels=[[1]]), m_ref, iou_ref, low_ref)


def test_sam2_of_unknown_size_without_yaml_is_one_line(tmp_path):
    path = save_meta_sam2(meta_sam2(SMALL_HIERA), tmp_path / "custom.pt")
    with pytest.raises(CheckpointError) as e:
        Segmenter.load(path)
    msg = str(e.value)
    assert "\n" not in msg and "custom.pt" in msg and "custom.yaml" in msg


# ---- SAM-HQ ------------------------------------------------------------------------------------------------------

def meta_sam_hq(seed: int = 0):
    """A small ViT SAM-HQ in Meta's classes (img 256, patch 4 -> a 64x64 grid, like SAM's), perturbed."""
    import_reference("segment_anything_hq")
    from segment_anything_hq.modeling import ImageEncoderViT, MaskDecoderHQ, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    dim, vit_dim = 32, 48
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=256, patch_size=4, embed_dim=vit_dim, depth=2, num_heads=2, mlp_ratio=4,
                                      out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=8, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoderHQ(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=dim, mlp_dim=64, num_heads=8), transformer_dim=dim, iou_head_depth=3,
            iou_head_hidden_dim=64, vit_dim=vit_dim))
    return _perturb(sam, seed)


@pytest.fixture(scope="module")
def hq_pair(tmp_path_factory):
    sa = import_reference("segment_anything_hq")
    meta = meta_sam_hq()
    path = tmp_path_factory.mktemp("hq") / "sam_hq_small.pth"
    torch.save(meta.state_dict(), path)
    ours = Segmenter.load(path)
    img = make_image(192, 256)
    predictor = sa.SamPredictor(meta)
    predictor.set_image(img)
    return predictor, ours, ours.embed([img])[0]


def test_sam_hq_embeddings_match(hq_pair):
    predictor, ours, emb = hq_pair
    assert ours.family == "sam_hq" and ours.net.resize == "pad"
    assert torch.allclose(predictor.features[0], emb.features, atol=1e-4)
    early = predictor.interm_features[0][0].permute(2, 0, 1)  # (h, w, D) -> (D, h, w)
    assert torch.allclose(early, emb.extras[0], atol=1e-4)


def test_sam_hq_prompts_match(hq_pair):
    """Single-mask answers equal Meta's; for a multimask prompt Meta returns one mask (SAM's best + HQ), which is
    our first of three (module docstring of model/_samhq_edge.py)."""
    predictor, ours, emb = hq_pair
    pts, lab = np.array([[120.0, 70.0], [30.0, 150.0]]), np.array([1, 0])
    box = np.array([70.0, 40.0, 190.0, 110.0])
    for multimask in (False, True):
        for case in (dict(point_coords=pts, point_labels=lab), dict(box=box)):
            m_ref, iou_ref, low_ref = predictor.predict(multimask_output=multimask, return_logits=True, **case)
            kw = dict(points=pts[None], labels=lab[None]) if "point_coords" in case else dict(boxes=box[None])
            got = ours.predict(emb, multimask=multimask, **kw)
            first = type(got)(got.masks[:, :1], got.iou_pred[:, :1], got.low_res_logits[:, :1])
            _compare(first, m_ref, iou_ref, low_ref.numpy()[0] if torch.is_tensor(low_ref) else low_ref)


def test_sam_hq_decodes_many_prompts_as_one_image(hq_pair):
    """The shared-image fast path (HQ features made once) gives what decoding each prompt alone gives."""
    _, ours, emb = hq_pair
    pts = np.array([[[40.0, 40.0]], [[120.0, 70.0]], [[200.0, 150.0]]])
    together = ours.predict(emb, points=pts, labels=np.ones((3, 1)))
    for i in range(3):
        alone = ours.predict(emb, points=pts[i:i + 1], labels=np.ones((1, 1)))
        assert torch.allclose(alone.low_res_logits[0], together.low_res_logits[i], atol=1e-4)


# ---- transformers directories ------------------------------------------------------------------------------------

def _tiny_hf(kind: str):
    import transformers

    from model._sam2_edge import sam2_arch, sam2_config

    torch.manual_seed(0)
    if kind == "sam2":
        return _perturb(transformers.Sam2Model(sam2_config(sam2_arch(dict(SMALL_HIERA, window_pos_embed_bkg_spatial_size=[7, 7]), 1024, 64)))), 1024
    if kind == "sam_hq":
        from model._sam_edge import sam_config
        from model._samhq_edge import hq_config

        vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=4, window_size=8,
                      global_attn_indexes=[1], mlp_dim=96)
        cfg = hq_config(sam_config(256, 64, 32, dict(mlp_dim=64, depth=2, heads=8, iou_head_hidden_dim=64),
                                   vision=vision), 48)
        return _perturb(transformers.SamHQModel(cfg)), 256
    if kind == "sam3_tracker":
        cfg = transformers.Sam3TrackerConfig()
        vc = cfg.vision_config.backbone_config
        vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.num_attention_heads = 32, 64, 2, 2
        vc.global_attn_indexes = [1]
        cfg.vision_config.backbone_config = vc
        return _perturb(transformers.Sam3TrackerModel(cfg)), int(cfg.prompt_encoder_config.image_size)
    raise ValueError(kind)


def test_sam_hq_transformers_directory_answers_as_meta(hq_pair, tmp_path):
    """A transformers SAM-HQ directory (here: the Meta weights saved by transformers) answers as Meta's SAM-HQ
    (transformers' own forward does not: model/_samhq_edge.py)."""
    predictor, ours, _ = hq_pair
    ours.net.model.save_pretrained(tmp_path / "hq")
    back = Segmenter.load(tmp_path / "hq")
    assert back.family == "sam_hq" and back.model_version.startswith("sam_hq-hf-")
    emb = back.embed([make_image(192, 256)])[0]
    pts, lab = np.array([[120.0, 70.0]]), np.array([1])
    m_ref, iou_ref, low_ref = predictor.predict(point_coords=pts, point_labels=lab, multimask_output=False,
                                                return_logits=True)
    _compare(back.predict(emb, points=pts[None], labels=lab[None], multimask=False), m_ref, iou_ref, low_ref)


@pytest.mark.parametrize("kind", ["sam2", "sam3_tracker"])
def test_transformers_directories_answer_as_the_model_itself(tmp_path, kind):
    model, side = _tiny_hf(kind)
    model.save_pretrained(tmp_path / kind)
    ours = Segmenter.load(tmp_path / kind)
    assert ours.family == kind and ours.model_version.startswith(f"{kind}-hf-")
    img = make_image(side, side)  # at the input size: no resize, so only the networks are compared
    emb = ours.embed([img])[0]
    pixels = (torch.from_numpy(img).permute(2, 0, 1).float()[None] - torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)) \
        / torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    pt = torch.tensor([[[[side * 0.4, side * 0.3]]]])
    with torch.no_grad():
        ref = model(pixel_values=pixels, input_points=pt, input_labels=torch.ones(1, 1, 1, dtype=torch.int64),
                    multimask_output=True)
    got = ours.predict(emb, points=pt[0].numpy(), labels=[[1]], upsample=False)
    ref_low = ref.pred_masks[0, 0]
    if ref_low.shape[-1] != 256:
        ref_low = torch.nn.functional.interpolate(ref_low[None], (256, 256), mode="bilinear", align_corners=False)[0]
    if kind == "sam2" or kind == "sam3_tracker":
        ref_low = ref_low.clamp(-32, 32)
    assert torch.allclose(got.low_res_logits[0], ref_low, atol=1e-4)
    assert torch.allclose(got.iou_pred[0], ref.iou_scores[0, 0], atol=1e-4)


def test_unsupported_directories_are_one_line(tmp_path):
    (tmp_path / "sam3").mkdir()
    (tmp_path / "sam3" / "config.json").write_text('{"model_type": "sam3"}')
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    for d, words in (("sam3", "sam3_tracker"), ("bert", "not a SAM family")):
        with pytest.raises(CheckpointError) as e:
            Segmenter.load(tmp_path / d)
        assert "\n" not in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("preset", ["sam2.1-hiera-tiny", "sam-hq-vit-b"])
def test_fresh_family_models_save_and_load(tmp_path, preset):
    """A fresh preset saves and loads back the same network: every weight equal, and the same answer to a click on
    the same embedding. SAM 2 tiny embeds a real image; for ViT-B SAM-HQ (one encoder pass is 70-140 s on 2 CPU
    cores) the embedding is random features of the shapes its decoder reads — its encoder runs in the parity tests
    above, on small configurations."""
    seg = Segmenter.new(preset)
    img = make_image(120, 160)
    if preset.startswith("sam-hq"):
        g = torch.Generator().manual_seed(0)
        emb = ImageEmbedding(features=torch.randn(256, 64, 64, generator=g), original_size=(120, 160),
                             input_size=(768, 1024), extras=(torch.randn(768, 64, 64, generator=g),))
    else:
        emb = seg.embed([img])[0]
    version = seg.save(tmp_path / "m")
    back = Segmenter.load(tmp_path / "m")
    assert back.model_version == version and back.family == seg.family
    mine, theirs = seg.net.state_dict(), back.net.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    a = seg.predict(emb, points=[[[50.0, 40.0]]], labels=[[1]])
    b = back.predict(emb, points=[[[50.0, 40.0]]], labels=[[1]])
    assert torch.equal(a.low_res_logits, b.low_res_logits)


# ---- retraining --------------------------------------------------------------------------------------------------

def _disc_scenes(n: int = 12, side: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    imgs, masks = [], []
    for _ in range(n):
        img = np.full((side, side, 3), 40, np.uint8)
        ms = []
        for _ in range(3):
            y, x = rng.integers(20, side - 76, 2)
            r = rng.integers(15, 40)
            m = (yy - y) ** 2 + (xx - x) ** 2 < r * r
            img[m] = rng.integers(120, 255, 3)
            ms.append(m)
        imgs.append(img)
        masks.append(np.stack(ms))
    return imgs, masks


def _one_click_miou(seg, imgs, masks) -> float:
    ious = []
    for img, ms in zip(imgs, masks):
        emb = seg.embed([img])[0]
        for m in ms:
            ys, xs = np.nonzero(m)
            k = len(ys) // 2
            p = seg.predict(emb, points=[[[xs[k], ys[k]]]], labels=[[1]])
            b = p.masks[0, int(p.iou_pred[0].argmax())].numpy()
            ious.append((b & m).sum() / max((b | m).sum(), 1))
    return float(np.mean(ious))


def test_a_sam2_model_retrains_its_decoder_and_leaves_the_encoder(tmp_path):
    """`train` on a SAM 2-family model (SAM 2's squash frame, its high-res features per mask): with parts "auto"
    (the decoder) the one-click mIoU on held-out scenes rises and the image encoder's weights do not move; the
    trained model saves and loads as what it is. Breakage: a trainer that does not learn, or trains the encoder."""
    from model.checkpoints import build_net
    from model._sam2_edge import sam2_arch
    from model.train import TrainSettings, dataset_sampler, train

    torch.manual_seed(0)
    arch = sam2_arch(dict(SMALL_HIERA, window_pos_embed_bkg_spatial_size=[7, 7]), 256, 64)
    seg = Segmenter(build_net(arch), arch, "sam2-small-init")
    imgs, masks = _disc_scenes(12)
    held_imgs, held_masks = _disc_scenes(4, seed=1)
    encoder = {k: v.clone() for k, v in seg.net.model.vision_encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in seg.net.model.mask_decoder.state_dict().items()}
    before = _one_click_miou(seg, held_imgs, held_masks)
    result = train(seg, dataset_sampler(imgs, masks), TrainSettings(max_steps=50, minutes=10, batch_images=4, lr=1e-3,
                                                                    optimizer="adamw", ema_decay=None))
    after = _one_click_miou(seg, held_imgs, held_masks)
    assert result.steps == 50
    assert after > before + 0.08, (before, after)
    assert all(torch.equal(encoder[k], v) for k, v in seg.net.model.vision_encoder.state_dict().items())
    assert any(not torch.equal(decoder[k], v) for k, v in seg.net.model.mask_decoder.state_dict().items())
    version = seg.save(tmp_path / "trained")
    back = Segmenter.load(tmp_path / "trained")
    assert back.model_version == version and back.family == "sam2"
    assert abs(_one_click_miou(back, held_imgs, held_masks) - after) < 1e-6


# ---- the stages ----------------------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.parametrize("family", ["sam2", "sam_hq"])
def test_the_automatic_stage_runs_a_family_checkpoint_on_ray(ray_cluster, tmp_path, family):
    """`model.checkpoint` naming a SAM 2 checkpoint (ours) or a Meta SAM-HQ .pth: the automatic stage's Ray actors
    load it, the generator runs in its frame, and the masks' lineage names the family's model_version; the
    evaluation reads the same model."""
    import yaml

    from engine.integrations import runtime
    from engine.integrations.config import load_config
    from model.checkpoints import build_net
    from model._sam2_edge import sam2_arch
    from stages.auto import run_auto_stage
    from storage.shards import MaskStore
    from tests.test_auto_stage import write_config

    if family == "sam2":
        arch = sam2_arch(dict(SMALL_HIERA, window_pos_embed_bkg_spatial_size=[7, 7]), 256, 64)
        ckpt = tmp_path / "sam2-small"
        torch.manual_seed(0)
        Segmenter(build_net(arch), arch, "x").save(ckpt)
    else:
        ckpt = tmp_path / "sam_hq_small.pth"
        torch.save(meta_sam_hq().state_dict(), ckpt)
    cfg_path = write_config(tmp_path, n_images=3, images_per_commit=2, num_actors=1, max_mask_fraction=1.0,
                            min_mask_region_area=0)
    doc = yaml.safe_load(cfg_path.read_text())
    doc["model"] = {"checkpoint": str(ckpt)}
    cfg_path.write_text(yaml.safe_dump(doc))
    cfg = load_config(cfg_path)
    seg = runtime.segmenter(cfg, cfg.model.checkpoint)
    assert seg.family == family
    summary = run_auto_stage(cfg, 1, None, show_progress=False)
    assert summary.images == 3 and summary.quarantined == 0
    table = MaskStore(cfg.path(cfg.storage.root)).read_table(columns=["model_version", "height", "width"], stage="auto")
    assert table.num_rows > 0
    assert set(table.column("model_version").to_pylist()) == {seg.model_version}
    assert set(table.column("height").to_pylist()) == {96} and set(table.column("width").to_pylist()) == {96}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.labelstudio
def test_the_round_loop_runs_end_to_end_on_a_sam2_model(tmp_path, labelstudio_server, ray_cluster):
    """`sa-engine run` with `model.checkpoint` a (tiny) SAM 2 model: the simulated annotators click through the
    real Label Studio and our backend (SAM 2's cached high-res features), the semi stage prefills, Ray Train
    retrains the decoder, the holdout gate decides, the automatic stage runs; every mask's lineage names a
    SAM 2 model version."""
    import json

    import yaml
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.integrations.config import load_config
    from engine.integrations.labelstudio import free_port
    from engine.integrations.synth import write_synthetic_dataset
    from model.checkpoints import build_net
    from model._sam2_edge import sam2_arch
    from storage.shards import MaskStore

    arch = sam2_arch(dict(SMALL_HIERA, window_pos_embed_bkg_spatial_size=[7, 7]), 256, 64)
    torch.manual_seed(0)
    version = Segmenter(build_net(arch), arch, "x").save(tmp_path / "sam2-small")
    write_synthetic_dataset(tmp_path / "data", n_images=6, seed=0, size=96)
    data = {
        "workdir": str(tmp_path / "run"),
        "model": {"checkpoint": str(tmp_path / "sam2-small")},
        "images": {"source": str(tmp_path / "data" / "images"),
                   "ground_truth": str(tmp_path / "data" / "annotations.json"),
                   "holdout_from_source": 2, "holdout_source": None, "holdout_ground_truth": None},
        "storage": {"root": str(tmp_path / "store")},
        "simulate": {"max_clicks": 2},
        "stages": {"manual": {"rounds": 1, "images_per_round": 2},
                   "semi": {"rounds": 1, "images_per_round": 1},
                   "auto": {"points_per_side": 4, "num_actors": 1, "pred_iou_thresh": 0.0,
                            "stability_score_thresh": 0.0, "min_mask_region_area": 0, "max_mask_fraction": 1.0}},
        "labelstudio": {"managed": False, "url": labelstudio_server.url, "token": labelstudio_server.token,
                        "ml_backend_port": free_port()},
        "train": {"steps": 3},
    }
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert result.exit_code in (0, 4), result.output
    cfg = load_config(path)
    store = MaskStore(cfg.storage.root)
    table = store.read_table(columns=["stage", "model_version"]).to_pylist()
    assert {"manual", "semi"} <= {r["stage"] for r in table}
    machine = {r["model_version"] for r in table if r["stage"] in ("semi", "auto") and r["model_version"]}
    assert machine and all(v.startswith("sam2") for v in machine), machine
    current = json.loads((Path(cfg.workdir) / "models" / "current.json").read_text())["checkpoint"]
    assert Segmenter.load(current).family == "sam2"
    assert version.startswith("sam2")


def test_every_preset_the_config_names_builds():
    """`model.preset`'s choices are exactly the presets `Segmenter.new` builds (a name in one and not the other
    would fail only at run time)."""
    import typing

    from engine.integrations.config import ModelConfig
    from model.checkpoints import family_presets, preset_arch

    names = set(typing.get_args(ModelConfig.model_fields["preset"].annotation))
    assert names == set(family_presets())
    for name in names:  # the architecture of each (building every large network would take minutes)
        assert preset_arch(name)["preset"] == name


def test_retraining_starts_any_preset_fresh_not_as_a_path():
    """One preset registry behind the config, the CLI and retraining: `sa-engine train --init sam2.1-hiera-tiny`
    builds that preset (a stale list of four names took it for a checkpoint path)."""
    from engine.retrain import _start_model

    seg = _start_model("sam2.1-hiera-tiny", seed=0)
    assert seg.model_version.startswith("sam2.1-hiera-tiny-init")


def test_an_edgetam_directory_without_timm_is_one_line(tmp_path):
    """EdgeTAM's image encoder comes from timm, whose wheels need torchvision (no CPU build here): loading its
    transformers directory says so in one line instead of failing inside transformers."""
    import importlib.util

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here: EdgeTAM loads")
    d = tmp_path / "edgetam"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "edgetam"}')
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError) as e:
        Segmenter.load(d)
    assert "\n" not in str(e.value) and "timm" in str(e.value)
