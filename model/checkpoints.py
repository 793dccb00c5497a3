"""Checkpoints: build a network from an architecture dict; save/load ours; load HF dirs and Meta .pth files.

Our format is a directory with `model.safetensors` (weights) and `sa_engine.json` (architecture,
model_version and free metadata: round, data fingerprint, metrics), written atomically, JSON last.
Nothing is fetched from the network; `.pth` files are read with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model._sam2_edge import HF_CLASSES, SAM2_TRUNKS, build_hf_family_net, build_sam2_net, is_meta_sam2_state, \
    load_hf_sam2, map_meta_sam2_state, meta_sam2_arch, sam2_arch
from model._sam_edge import SamNet, hf_model_type, load_hf_sam, sam_config, vit_encoder
from model._samhq_edge import build_hq_net, hq_arch, hq_config, is_meta_hq_state, load_hf_sam_hq, map_meta_hq_state
from model.encoders import COMPACT_DEFAULT, VIT_PRESETS, CompactEncoder
from storage.backend import sha256_file

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "sa_engine.json"
FORMAT = "sa-engine/1"
META_ARCH_KEY = "sa_engine_arch"  # see _load_meta_pth: a Meta-layout .pth around our compact encoder
# Alias of shared_image_embedding (SAM ties the two); saved once, restored on load.
_ALIAS_PREFIX = "prompt_encoder.shared_embedding."


class CheckpointError(ValueError):
    """A checkpoint that can't be used; the message is one line naming the file and the reason."""

# Fresh models of each family (`Segmenter.new(preset)`, `model.preset`): docs/models.md.
SAM2_PRESETS = tuple(SAM2_TRUNKS)
HQ_PRESETS = tuple(f"sam-hq-vit-{s}" for s in "blh")


# The one preset registry: the config check (model.preset), `sa-engine train --init` and retraining read it.
PRESETS: tuple[str, ...] = ("compact", *sorted(VIT_PRESETS), *HQ_PRESETS, *SAM2_PRESETS)


def family_presets() -> list[str]:
    """Every preset name `Segmenter.new` takes."""
    return list(PRESETS)


def build_net(arch: dict):
    """An untrained network for an architecture dict (see `compact_arch` / `vit_arch` / `preset_arch`)."""
    family = arch.get("family", "sam")
    if family == "sam2" and "trunk" in arch:
        return build_sam2_net(arch)
    if family in HF_CLASSES:
        return build_hf_family_net(arch)
    if family == "sam_hq":
        return build_hq_net(arch)
    kind = arch.get("encoder")
    if kind == "compact":
        size, stride, dim = arch["image_size"], arch["out_stride"], arch["prompt_dim"]
        config = sam_config(size, size // stride, dim, arch["decoder"])
        return SamNet(CompactEncoder(arch["widths"], stride, dim), config)
    if kind == "vit":
        size, patch = arch["image_size"], arch["vision"]["patch_size"]
        config = sam_config(size, size // patch, arch["prompt_dim"], arch["decoder"], vision=arch["vision"])
        return SamNet(vit_encoder(config), config)
    raise CheckpointError(f"architecture: unknown encoder {kind!r} (expected 'compact' or 'vit')")


def compact_arch(**overrides) -> dict:
    """The compact preset's architecture dict (COMPACT_DEFAULT with overrides)."""
    arch = json.loads(json.dumps(COMPACT_DEFAULT))
    arch.update(overrides)
    arch.update(encoder="compact", preset="compact")
    return arch


def preset_arch(preset: str) -> dict:
    """The architecture dict of a named fresh model: compact, sam-vit-b/l/h, sam-hq-vit-b/l/h, sam2.1-hiera-*."""
    if preset == "compact":
        return compact_arch()
    if preset in SAM2_TRUNKS:
        return sam2_arch(SAM2_TRUNKS[preset], preset=preset)
    if preset in HQ_PRESETS:
        vit = vit_arch(preset.replace("sam-hq-", "sam-"))
        size, patch = vit["image_size"], vit["vision"]["patch_size"]
        cfg = sam_config(size, size // patch, vit["prompt_dim"], vit["decoder"], vision=vit["vision"])
        return hq_arch(hq_config(cfg, vit["vision"]["hidden_size"]), preset)
    return vit_arch(preset)


def vit_arch(preset: str) -> dict:
    """SAM ViT-B/L/H at 1024 px with SAM's prompt encoder and decoder (untrained)."""
    if preset not in VIT_PRESETS:
        raise CheckpointError(f"preset {preset!r}: unknown (expected one of {family_presets()})")
    vision = dict(VIT_PRESETS[preset], patch_size=16, window_size=14, mlp_ratio=4.0)
    return dict(encoder="vit", preset=preset, image_size=1024, prompt_dim=256, vision=vision,
                decoder=dict(mlp_dim=2048, depth=2, heads=8, iou_head_hidden_dim=256))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 (hex, 12 chars) of a state dict's names and bytes: a content-derived model version."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _own_state(net: SamNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if not k.startswith(_ALIAS_PREFIX)}


def save_checkpoint(net: SamNet, arch: dict, directory: str | Path, metadata: dict) -> str:
    """Write `directory` (model.safetensors + sa_engine.json, with the weights' sha256) as one unit:
    everything goes to a hidden sibling folder first, which then takes the directory's place by rename, so
    a crash never leaves new weights beside an old model_version. Returns model_version."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in _own_state(net).items()}
    version = metadata.get("model_version") or f"{arch.get('preset', 'model')}-{state_digest(state)}"
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        doc = {"format": FORMAT, "model_version": version, "arch": arch, "metadata": metadata,
               "weights_sha256": _sha256(tmp / WEIGHTS_FILE)}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
        for f in (tmp / WEIGHTS_FILE, tmp / CONFIG_FILE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out.exists():  # a directory can't be renamed onto a non-empty one: move the old one aside first
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return version


def collect_checkpoint_garbage(models_dir: str | Path, min_age_s: float = 3600.0) -> list[str]:
    """Delete what killed saves under `models_dir` left (hidden ".<name>.tmp-*" / ".<name>.old-*" folders)
    older than `min_age_s`; an old copy whose checkpoint is missing is moved back instead. Returns the paths
    acted on."""
    root, now, done = Path(models_dir), time.time(), []
    if not root.is_dir():
        return done
    for path in sorted(root.glob(".*.old-*")) + sorted(root.glob(".*.tmp-*")):
        if not path.is_dir() or now - path.stat().st_mtime < min_age_s:
            continue
        name = path.name[1:].rsplit(".", 1)[0]
        if ".old-" in path.name and not (root / name).exists():
            os.replace(path, root / name)  # the save died between its two renames: the old model is back
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(str(path))
    return done


def _sha256(p: Path) -> str:
    return sha256_file(p)


def load_state_strict(net: SamNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `net`, or raise CheckpointError listing missing/unexpected keys and shape mismatches."""
    expected = _own_state(net)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape))
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", … (+{len(items) - 8})" if len(items) > 8 else "")
                parts.append(f"{len(items)} {name}: {shown}")
        raise CheckpointError(f"{source}: weights do not fit the architecture; " + "; ".join(parts))
    full = dict(state)
    for k in list(state):
        if k.startswith("shared_image_embedding."):
            full[_ALIAS_PREFIX + k[len("shared_image_embedding."):]] = state[k]
    net.load_state_dict(full, strict=True)


def trained_steps(path: str | Path) -> int | None:
    """Optimisation steps behind one of our checkpoints, over its whole history (0: a fresh model);
    None for anything else (a transformers or Meta checkpoint: trained weights of unknown history).
    Reads only the JSON config."""
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        return None
    meta = _read_config(p)["metadata"]
    try:
        return int(meta.get("steps_before", 0)) + int((meta.get("train") or {}).get("steps", 0))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{p / CONFIG_FILE}: not a valid sa-engine config ({type(e).__name__}: {e})") from None


def _read_config(p: Path) -> dict:
    """Our directory's sa_engine.json: {arch, model_version, metadata (a dict, maybe empty)}."""
    try:
        doc = json.loads((p / CONFIG_FILE).read_text())
        return {"arch": doc["arch"], "model_version": doc["model_version"], "metadata": doc.get("metadata") or {},
                "weights_sha256": doc.get("weights_sha256")}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{p / CONFIG_FILE}: not a valid sa-engine config ({type(e).__name__}: {e})") from None


def load_checkpoint(path: str | Path) -> tuple[SamNet, dict, str, dict]:
    """Any supported checkpoint -> (net in eval mode, arch, model_version, metadata).

    path: our directory (sa_engine.json), a transformers SAM directory (config.json with
    model_type "sam"), or a Meta `.pth`/`.pt` file (`sam_vit_b_01ec64.pth` layout).
    """
    p = Path(path)
    if not p.exists():
        left = sorted(p.parent.glob(f".{p.name}.old-*")) if p.parent.is_dir() else []
        hint = f" (a save was interrupted: the previous copy is {left[0]}; `sa-engine gc` restores it)" if left else ""
        raise CheckpointError(f"{p}: checkpoint not found{hint}")
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        net, arch, version, meta = _load_ours(p)
    elif p.is_dir() and (p / "config.json").is_file():
        net, arch, version, meta = _load_hf(p)
    elif p.is_dir():
        raise CheckpointError(f"{p}: directory has neither {CONFIG_FILE} (sa-engine) nor config.json (transformers)")
    else:
        net, arch, version, meta = _load_meta_pth(p)
    return net.eval(), arch, version, meta


def _load_ours(p: Path) -> tuple[SamNet, dict, str, dict]:

    doc = _read_config(p)
    arch, version = doc["arch"], doc["model_version"]
    weights = p / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    if doc["weights_sha256"] and _sha256(weights) != doc["weights_sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match {CONFIG_FILE}'s weights_sha256 (damaged, or "
                              f"replaced without its config): not loading it as {version}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors ({e})".replace("\n", " ")) from None
    net = build_net(arch)
    load_state_strict(net, state, str(weights))
    return net, arch, version, doc["metadata"]


def _file_digest(p: Path) -> str:
    return _sha256(p)[:12]


HF_FAMILIES = ("sam", "sam_hq", *HF_CLASSES)


def _load_hf(p: Path) -> tuple[SamNet, dict, str, dict]:
    model_type = hf_model_type(p)
    if model_type == "sam3":
        raise CheckpointError(f"{p}: a full SAM 3 model (model_type 'sam3'); for points and boxes point the engine "
                              "at its tracker part (model_type 'sam3_tracker'), see docs/models.md")
    if model_type not in HF_FAMILIES:
        raise CheckpointError(f"{p}: transformers model_type {model_type!r} is not a SAM family model "
                              f"(supported: {', '.join(HF_FAMILIES)})")
    weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"{p}: no weights file (*.safetensors or *.bin) next to config.json")
    if model_type == "edgetam" and importlib.util.find_spec("timm") is None:
        raise CheckpointError(f"{p}: EdgeTAM's image encoder comes from timm, which is not installed "
                              "(timm needs torchvision: install both where a build exists)")
    try:
        if model_type == "sam_hq":
            net, arch = load_hf_sam_hq(p)
        elif model_type in HF_CLASSES:
            net, arch = load_hf_sam2(p, model_type)
        else:
            net = load_hf_sam(p)
    except ImportError as e:  # EdgeTAM's encoder comes from timm
        raise CheckpointError(f"{p}: {model_type} needs a package that is not installed ({e})"
                              .replace("\n", " ")[:500]) from None
    except Exception as e:  # transformers raises many kinds; the user needs one line naming the dir
        raise CheckpointError(f"{p}: transformers could not load it ({type(e).__name__}: {e})"
                              .replace("\n", " ")[:500]) from None
    if model_type != "sam":
        return net, arch, f"{model_type}-hf-{_file_digest(weights[0])}", {"source": str(p.resolve())}
    cfg = net.config
    vc, dc = cfg.vision_config, cfg.mask_decoder_config
    vision = {k: getattr(vc, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "patch_size", "window_size", "mlp_dim", "use_rel_pos",
                                          "use_abs_pos", "qkv_bias", "layer_norm_eps")}
    vision["global_attn_indexes"] = list(vc.global_attn_indexes)
    decoder = dict(mlp_dim=dc.mlp_dim, depth=dc.num_hidden_layers, heads=dc.num_attention_heads,
                   iou_head_hidden_dim=dc.iou_head_hidden_dim,
                   mask_input_channels=cfg.prompt_encoder_config.mask_input_channels)
    arch = dict(encoder="vit", preset="sam-hf", image_size=net.image_size,
                prompt_dim=int(cfg.prompt_encoder_config.hidden_size), vision=vision, decoder=decoder)
    version = f"sam-hf-{_file_digest(weights[0])}"
    return net, arch, version, {}


# Meta's segment-anything names -> ours (transformers' names under our module layout).
_META_RULES: list[tuple[str, str]] = [
    (r"^image_encoder\.patch_embed\.proj\.", "image_encoder.vit.patch_embed.projection."),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"image_encoder.vit.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.(\d+)\.", r"image_encoder.vit.layers.\1."),
    (r"^image_encoder\.neck\.0\.", "image_encoder.vit.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "image_encoder.vit.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "image_encoder.vit.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "image_encoder.vit.neck.layer_norm2."),
    (r"^image_encoder\.pos_embed$", "image_encoder.vit.pos_embed"),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "shared_image_embedding.positional_embedding"),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)$")


def map_meta_state(state: dict[str, torch.Tensor], vit_encoder: bool = True) -> dict[str, torch.Tensor]:
    """Rename a Meta SAM state dict to our names (unknown keys pass through, to be reported).

    vit_encoder=False: the image encoder is ours (the compact one in a Meta-layout file), so its
    keys are already our names and are left as they are.
    """
    depth: dict[str, int] = {}
    for k in state:
        m = _MLP.match(k)
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {}
    for k, v in state.items():
        m = _MLP.match(k)
        if m:
            head, j, rest = m.group(1), int(m.group(2)), m.group(3)
            name = "proj_in" if j == 0 else "proj_out" if j == depth[head] - 1 else f"layers.{j - 1}"
            out[f"{head}.{name}.{rest}"] = v
            continue
        for pattern, repl in _META_RULES:
            if not vit_encoder and k.startswith("image_encoder."):
                break
            if re.search(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        out[k] = v
    return out


def meta_arch(state: dict[str, torch.Tensor], source: str) -> dict:
    """Infer the architecture of a Meta SAM state dict from its tensor shapes.

    Heads of the ViT come from the relative-position tables (head_dim wide); the decoder's heads are
    not visible in shapes and are 8, as in every model Meta's build_sam.py makes.
    """
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{source}: not a segment-anything state dict (no {key!r})")
        return state[key]

    proj = need("image_encoder.patch_embed.proj.weight")
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    depth = len(blocks)
    prompt_dim = int(need("prompt_encoder.no_mask_embed.weight").shape[1])
    if "image_encoder.pos_embed" in state:
        grid = int(state["image_encoder.pos_embed"].shape[1])
    else:
        raise CheckpointError(f"{source}: no image_encoder.pos_embed; cannot infer the input size")
    image_size = grid * patch
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in state
    global_idx, window, heads = [], 14, 1
    if use_rel_pos:
        for i in blocks:
            rel = state[f"image_encoder.blocks.{i}.attn.rel_pos_h"]
            if int(rel.shape[0]) == 2 * grid - 1:
                global_idx.append(i)
            else:
                window = (int(rel.shape[0]) + 1) // 2
        heads = dim // int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
    mlp_dim = int(need("image_encoder.blocks.0.mlp.lin1.weight").shape[0])
    dec_layers = {int(m.group(1)) for k in state if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    vision = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
                  window_size=window, global_attn_indexes=global_idx, mlp_dim=mlp_dim,
                  use_rel_pos=use_rel_pos, use_abs_pos=True,
                  qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state)
    decoder = dict(mlp_dim=int(need("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0]),
                   depth=len(dec_layers), heads=8,
                   iou_head_hidden_dim=int(need("mask_decoder.iou_prediction_head.layers.0.weight").shape[0]),
                   mask_input_channels=int(need("prompt_encoder.mask_downscaling.3.weight").shape[0]))
    preset = {768: "sam-vit-b", 1024: "sam-vit-l", 1280: "sam-vit-h"}.get(dim, "sam-vit") if image_size == 1024 else "sam-vit"
    return dict(encoder="vit", preset=preset, image_size=image_size, prompt_dim=prompt_dim,
                vision=vision, decoder=decoder)


def _load_meta_pth(p: Path) -> tuple[SamNet, dict, str, dict]:

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a loadable weights-only PyTorch file ({first})") from None
    # A Meta-layout file around our compact encoder (not in Meta's builds) names its architecture,
    # which shapes cannot tell (input size, decoder heads): {"model": state, "sa_engine_arch": arch}.
    named_arch = obj.get(META_ARCH_KEY) if isinstance(obj, dict) else None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a state dict of tensors, got {type(obj).__name__}")
    if is_meta_sam2_state(obj):
        return _load_meta_sam2(p, obj)
    if is_meta_hq_state(obj):
        arch = meta_arch(obj, str(p))
        size, patch = arch["image_size"], arch["vision"]["patch_size"]
        cfg = sam_config(size, size // patch, arch["prompt_dim"], arch["decoder"], vision=arch["vision"])
        arch = hq_arch(hq_config(cfg, arch["vision"]["hidden_size"]), arch["preset"].replace("sam-", "sam-hq-"))
        net = build_net(arch)
        load_state_strict(net.model, map_meta_hq_state(obj, map_meta_state), str(p))
        return net, arch, f"{arch['preset']}-{_file_digest(p)}", {"source": str(p.resolve())}
    if isinstance(named_arch, dict) and named_arch.get("encoder") == "compact":
        arch = compact_arch(**{k: v for k, v in named_arch.items() if k not in ("encoder", "preset")})
        net = build_net(arch)
        load_state_strict(net, map_meta_state(obj, vit_encoder=False), str(p))
        return net, arch, f"{arch['preset']}-{_file_digest(p)}", {"source": str(p.resolve())}
    arch = meta_arch(obj, str(p))
    net = build_net(arch)
    load_state_strict(net, map_meta_state(obj), str(p))
    return net, arch, f"{arch['preset']}-{_file_digest(p)}", {"source": str(p.resolve())}


def _load_meta_sam2(p: Path, state: dict[str, torch.Tensor]):
    """A Meta SAM 2 / 2.1 checkpoint: the size from the weights (a Meta preset), or named by Meta's yaml config
    beside it (`<name>.yaml`, its `model:` section); the video-memory weights are left out."""
    named = None
    yml = p.with_suffix(".yaml")
    if yml.is_file():
        import yaml

        try:
            doc = yaml.safe_load(yml.read_text())
            named = doc["model"] if isinstance(doc, dict) and isinstance(doc.get("model"), dict) else None
        except (yaml.YAMLError, OSError) as e:
            raise CheckpointError(f"{yml}: not a readable yaml config ({type(e).__name__})") from None
        if named is None:
            raise CheckpointError(f"{yml}: no `model:` section (expected one of Meta's sam2 configs)")
    try:
        arch = meta_sam2_arch(state, str(p), named)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    net = build_net(arch)
    load_state_strict(net.model, map_meta_sam2_state(state), str(p))
    return net, arch, f"{arch['preset']}-{_file_digest(p)}", {"source": str(p.resolve())}
