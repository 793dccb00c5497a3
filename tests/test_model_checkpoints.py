"""Loading transformers SAM directories (SamModel.save_pretrained layout) and refusing unsupported ones."""
import json

import numpy as np
import pytest
import torch
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from model.checkpoints import CheckpointError
from model.segmenter import Segmenter

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=128, patch_size=8, window_size=4, global_attn_indexes=[1],
                                      num_pos_feats=16),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=128, patch_size=8),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                 iou_head_hidden_dim=32))
    model = SamModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf") / "sam-tiny"
    model.save_pretrained(d)
    return d, model


def test_hf_directory_loads_and_matches_transformers(hf_dir):
    d, model = hf_dir
    seg = Segmenter.load(d)
    img = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    emb = seg.embed([img])[0]
    from model.segmenter import preprocess

    pixels, _ = preprocess([img], 128)
    with torch.no_grad():
        ref_emb = model.get_image_embeddings(pixels)
        assert torch.allclose(ref_emb[0], emb.features, atol=1e-5)
        pts = torch.tensor([[[[40.0, 50.0]]]])
        out = model(image_embeddings=ref_emb, input_points=pts, input_labels=torch.ones(1, 1, 1, dtype=torch.long))
    p = seg.predict(emb, np.array([[[40.0, 50.0]]]), np.ones((1, 1)), upsample=False)
    assert torch.allclose(out.iou_scores[0], p.iou_pred, atol=1e-5)
    native = torch.nn.functional.interpolate(out.pred_masks[0], (256, 256), mode="bilinear", align_corners=False)
    assert torch.allclose(native, p.low_res_logits, atol=1e-4)


def test_unsupported_model_type_and_missing_weights(tmp_path, hf_dir):
    d = tmp_path / "clip"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model_type 'clip' is not a SAM family model"):
        Segmenter.load(d)
    e = tmp_path / "noweights"
    e.mkdir()
    (e / "config.json").write_text(json.dumps({"model_type": "sam"}))
    with pytest.raises(CheckpointError, match="no weights file"):
        Segmenter.load(e)
    with pytest.raises(CheckpointError, match="neither"):
        Segmenter.load(tmp_path)
