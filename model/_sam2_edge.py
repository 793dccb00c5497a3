"""The SAM 2 edge: SAM 2 / 2.1 (and the SAM 2-style interactive heads of SAM 3's tracker and EdgeTAM) through
`transformers`, and Meta's SAM 2 checkpoint format.

Nothing else in the project imports transformers' SAM 2 classes. `Sam2Net` gives the Segmenter the same surface
as `SamNet` (`image_encoder`, `decode`, `dense_pe`, sizes), with two differences the Segmenter honours:
- the encoder returns (embedding, high-res s0, high-res s1): SAM 2's mask decoder adds the 1/4 and 1/8 scale
  features (already projected by its conv_s0 / conv_s1, once per image) while upscaling, so they are cached with
  the embedding;
- `resize = "squash"`: SAM 2 resizes every image to S×S (no aspect-preserving pad) and upsamples the low-res
  logits straight to the original size, as Meta's `SAM2Transforms` do.
The image predictor's path only: the video memory (memory attention / encoder, object pointers) is not built,
and its weights in a Meta checkpoint are left out.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from model._hf_net import HFNet

# Meta's sam2 / sam2.1 image-encoder trunks (configs/sam2.1/*.yaml; Hiera's defaults where a config is silent).
# The heads and the windows are not visible in the weights' shapes, so a checkpoint is matched to one of these
# by (embed_dim, stages), or named by a Meta yaml config beside it.
SAM2_TRUNKS: dict[str, dict] = {
    "sam2.1-hiera-tiny": dict(embed_dim=96, num_heads=1, stages=[1, 2, 7, 2], global_att_blocks=[5, 7, 9],
                              window_spec=[8, 4, 14, 7], window_pos_embed_bkg_spatial_size=[7, 7]),
    "sam2.1-hiera-small": dict(embed_dim=96, num_heads=1, stages=[1, 2, 11, 2], global_att_blocks=[7, 10, 13],
                               window_spec=[8, 4, 14, 7], window_pos_embed_bkg_spatial_size=[7, 7]),
    "sam2.1-hiera-base-plus": dict(embed_dim=112, num_heads=2, stages=[2, 3, 16, 3],
                                   global_att_blocks=[12, 16, 20], window_spec=[8, 4, 14, 7],
                                   window_pos_embed_bkg_spatial_size=[14, 14]),
    "sam2.1-hiera-large": dict(embed_dim=144, num_heads=2, stages=[2, 6, 36, 4], global_att_blocks=[23, 33, 43],
                               window_spec=[8, 4, 16, 8], window_pos_embed_bkg_spatial_size=[7, 7]),
}
# transformers model_type -> the class holding the SAM 2-style interactive heads
HF_CLASSES = {"sam2": "Sam2Model", "sam3_tracker": "Sam3TrackerModel", "edgetam": "EdgeTamModel"}


def sam2_arch(trunk: dict, image_size: int = 1024, d_model: int = 256, preset: str = "sam2") -> dict:
    """The architecture dict of a SAM 2 model (our checkpoints store it): Meta's trunk keys, input side, width."""
    return dict(family="sam2", preset=preset, image_size=int(image_size), d_model=int(d_model),
                trunk={k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in trunk.items()})


def sam2_config(arch: dict):
    """A transformers `Sam2Config` for a SAM 2 architecture dict (see `sam2_arch`)."""
    from transformers import Sam2Config
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    t, S, d = arch["trunk"], int(arch["image_size"]), int(arch["d_model"])
    n = len(t["stages"])
    dims = [int(t["embed_dim"]) * 2 ** i for i in range(n)]
    heads = [int(t["num_heads"]) * 2 ** i for i in range(n)]
    hiera = Sam2HieraDetConfig(
        hidden_size=dims[0], num_attention_heads=heads[0], image_size=[S, S], blocks_per_stage=list(t["stages"]),
        embed_dim_per_stage=dims, num_attention_heads_per_stage=heads, window_size_per_stage=list(t["window_spec"]),
        global_attention_blocks=list(t["global_att_blocks"]),
        window_positional_embedding_background_size=list(t["window_pos_embed_bkg_spatial_size"]),
        num_query_pool_stages=n - 1)
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=dims[::-1], fpn_hidden_size=d,
                              backbone_feature_sizes=[[S // 4, S // 4], [S // 8, S // 8], [S // 16, S // 16]])
    # Meta builds SAM 2's decoder with fixed sizes (SAM2Base._build_sam_heads): depth 2, MLP 2048, 8 heads.
    return Sam2Config(vision_config=vision,
                      prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=d, image_size=S, patch_size=16),
                      mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=d, mlp_dim=2048, num_hidden_layers=2,
                                                                num_attention_heads=8, iou_head_hidden_dim=256))


class _Sam2Encoder(nn.Module):
    """pixels (B, 3, S, S) -> (embedding (B, C, S/16, S/16) with SAM 2's no-memory token added,
    s0 (B, C/8, S/4, S/4), s1 (B, C/4, S/8, S/8)), as the image predictor caches them."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the net holds (and saves) it once

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, b = self.model, pixels.shape[0]
        maps = m.get_image_features(pixels, return_dict=True).fpn_hidden_states  # each (HW, B, C)
        maps = list(maps)
        maps[-1] = maps[-1] + m.no_memory_embedding
        s0, s1, main = [f.permute(1, 2, 0).reshape(b, -1, *size) for f, size in zip(maps, m.backbone_feature_sizes)]
        return main, s0, s1


class Sam2Net(HFNet):
    """A transformers SAM 2-family model (Sam2Model, Sam3TrackerModel, EdgeTamModel) as the Segmenter's network.

    Coordinates handed to `decode` are pixels of the S×S encoder input (the image squashed to S×S)."""

    resize = "squash"

    def __init__(self, model, arch: dict):
        pc = model.config.prompt_encoder_config
        super().__init__(model, arch.get("family", "sam2"), _Sam2Encoder(model), pc.image_size // pc.patch_size)

    def decode(self, embeddings: torch.Tensor, points, labels, boxes, mask_input, multimask: bool,
               pe: torch.Tensor | None = None, extras: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt per row: embeddings (P, C, h, w); extras = (s0 (P, C/8, 4h, 4w), s1 (P, C/4, 2h, 2w));
        points (P, K, 2) / boxes (P, 4) input-frame pixels; labels (P, K) 1/0/-1; mask_input (P, 1, 4h, 4w).
        Returns low-res logits (P, M, 4h, 4w) and IoU predictions (P, M)."""
        if pe is not None:
            raise ValueError("SAM 2 family: decoding against a window of the grid (crop training) is not supported")
        s0, s1 = extras
        n = embeddings.shape[0]
        sparse, dense = self.model.prompt_encoder(
            input_points=None if points is None else points[:, None],
            input_labels=None if labels is None else labels[:, None].to(torch.int64),
            input_boxes=None if boxes is None else boxes[:, None],
            input_masks=mask_input)
        if sparse is None:  # a mask prompt alone: SAM 2 pads with one not-a-point (label -1)
            sparse, _ = self.model.prompt_encoder(
                input_points=torch.zeros(n, 1, 1, 2, device=embeddings.device),
                input_labels=-torch.ones(n, 1, 1, dtype=torch.int64, device=embeddings.device),
                input_boxes=None, input_masks=None)
        if dense.shape[0] != n:
            dense = dense.expand(n, -1, -1, -1)
        # Each prompt row is its own "image" (batch P, one prompt each) with its own copy of the features.
        low, iou, _, _ = self.model.mask_decoder(
            image_embeddings=embeddings, image_positional_embeddings=self.dense_pe().expand(n, -1, -1, -1),
            sparse_prompt_embeddings=sparse.reshape(n, 1, *sparse.shape[-2:]), dense_prompt_embeddings=dense,
            multimask_output=multimask, high_resolution_features=[s0, s1])
        return low[:, 0], iou[:, 0]


def build_sam2_net(arch: dict) -> Sam2Net:
    from transformers import Sam2Model

    config = sam2_config(arch)
    config._attn_implementation = "sdpa"
    return Sam2Net(Sam2Model(config).eval(), arch)


def load_hf_sam2(directory: Path, model_type: str) -> tuple[Sam2Net, dict]:
    """A transformers directory of model_type sam2 / sam3_tracker / edgetam -> (net, arch).
    Raises what transformers raises."""
    import transformers

    cls = getattr(transformers, HF_CLASSES[model_type])
    model = cls.from_pretrained(str(directory), local_files_only=True).eval()
    arch = dict(family=model_type, preset=f"{model_type}-hf", image_size=int(model.config.prompt_encoder_config.image_size),
                hf_config=model.config.to_dict())
    return Sam2Net(model, arch), arch


def build_hf_family_net(arch: dict) -> Sam2Net:
    """A SAM 2-family network from an arch dict that carries a transformers config (`hf_config`)."""
    import transformers

    cfg_cls = getattr(transformers, HF_CLASSES[arch["family"]].replace("Model", "Config"))
    config = cfg_cls.from_dict(dict(arch["hf_config"]))
    config._attn_implementation = "sdpa"
    return Sam2Net(getattr(transformers, HF_CLASSES[arch["family"]])(config).eval(), arch)


# ---- Meta's SAM 2 checkpoints ---------------------------------------------------------------------------------

_META_SAM2_RULES: list[tuple[str, str]] = [
    (r"^no_mem_embed$", "no_memory_embedding"),
    (r"^image_encoder\.trunk\.patch_embed\.proj\.", "vision_encoder.backbone.patch_embed.projection."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.backbone.blocks.\1.layer_norm\2."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.0\.", r"vision_encoder.backbone.blocks.\1.mlp.proj_in."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.1\.", r"vision_encoder.backbone.blocks.\1.mlp.proj_out."),
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"^sam_prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "shared_image_embedding.positional_embedding"),
    (r"^sam_prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^sam_prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^sam_prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^sam_prompt_encoder\.", "prompt_encoder."),
    (r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.0\.", r"mask_decoder.transformer.layers.\1.mlp.proj_in."),
    (r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.1\.", r"mask_decoder.transformer.layers.\1.mlp.proj_out."),
    (r"^sam_mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^sam_mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^sam_mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^sam_mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"^sam_mask_decoder\.", "mask_decoder."),
]
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head))"
                  r"\.layers\.(\d+)\.(.+)$")
# The video memory: not part of the image predictor, left out on load.
_VIDEO_PREFIXES = ("memory_attention.", "memory_encoder.", "obj_ptr_proj.", "obj_ptr_tpos_proj.", "mask_downsample.",
                   "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")


def is_meta_sam2_state(state: dict) -> bool:
    return "image_encoder.trunk.patch_embed.proj.weight" in state and "sam_mask_decoder.iou_token.weight" in state


def map_meta_sam2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Meta SAM 2 state dict to transformers' Sam2Model names, video-memory weights left out."""
    depth: dict[str, int] = {}  # layers per MLP head, to name its first / middle / last layers
    for k in state:
        m = _MLP.match(k.replace("sam_mask_decoder.", "mask_decoder.", 1))
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    out: dict[str, torch.Tensor] = {}
    points: dict[int, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(_VIDEO_PREFIXES):
            continue
        m = re.match(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$", k)
        if m:  # four (1, C) embeddings -> one (4, C) table
            points[int(m.group(1))] = v
            continue
        for pattern, repl in _META_SAM2_RULES:
            if re.search(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        if k.startswith("mask_decoder.transformer."):
            k = k.replace(".out_proj.", ".o_proj.")
        m = _MLP.match(k)
        if m:
            head, j, rest = m.group(1), int(m.group(2)), m.group(3)
            k = f"{head}.{'proj_in' if j == 0 else 'proj_out' if j == depth[head] - 1 else f'layers.{j - 1}'}.{rest}"
        out[k] = v
    if points:
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)])
    return out


def meta_sam2_arch(state: dict[str, torch.Tensor], source: str, named: dict | None = None) -> dict:
    """The architecture of a Meta SAM 2 state dict: stages and widths from the shapes, heads and windows from
    the matching Meta preset, or from `named` (a Meta yaml's `model` section) when one is given.
    Raises ValueError (one line) for a size that is neither."""
    dim = int(state["image_encoder.trunk.patch_embed.proj.weight"].shape[0])
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))})
    stages, count = [], 0
    for i in blocks:  # a block with a `proj` opens a new stage (its width doubles)
        if f"image_encoder.trunk.blocks.{i}.proj.weight" in state and count:
            stages.append(count)
            count = 0
        count += 1
    stages.append(count)
    d_model = int(state["sam_prompt_encoder.no_mask_embed.weight"].shape[1])
    bkg = list(state["image_encoder.trunk.pos_embed"].shape[-2:])
    if named:
        trunk_cfg = (named.get("image_encoder") or {}).get("trunk") or {}
        trunk = dict(embed_dim=dim, num_heads=int(trunk_cfg.get("num_heads", 1)), stages=stages,
                     global_att_blocks=list(trunk_cfg.get("global_att_blocks", [12, 16, 20])),
                     window_spec=list(trunk_cfg.get("window_spec", [8, 4, 14, 7])),
                     window_pos_embed_bkg_spatial_size=bkg)
        return sam2_arch(trunk, int(named.get("image_size", 1024)), d_model, preset="sam2-named")
    for name, trunk in SAM2_TRUNKS.items():
        if trunk["embed_dim"] == dim and trunk["stages"] == stages and trunk["window_pos_embed_bkg_spatial_size"] == bkg:
            return sam2_arch(trunk, 1024, d_model, preset=name)
    raise ValueError(f"{source}: a SAM 2 checkpoint of no known size (embed_dim {dim}, stages {stages}); "
                          f"put Meta's yaml config beside it as {Path(source).with_suffix('.yaml').name} to name it")
