"""Retraining memory per GPU, estimated for every preset and `train.parts` choice (no GPU was lent to measure it).

For each preset the network is built on PyTorch's "meta" device (shapes only, no memory), its parameters are
split as the trainer splits them (model/train.py `_choose_trainable`), and the parameter-side memory of one
data-parallel worker is counted: fp32 weights of the whole model, plus, for the parameters that train, fp32
gradients and AdamW's two fp32 moments (16 bytes per trained parameter in all). Activations come on top and
depend on the batch: with a frozen encoder they are the decoder's (small); training the encoder at 1024 px holds
its activations for the backward pass, which dominates for ViT-H / Hiera-L (measure with benchmarks/gpu_suite.sh
where a GPU is lent). Last line: one JSON object {preset: {parts: GiB}}.

    python benchmarks/train_memory.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoints import build_net, family_presets, preset_arch  # noqa: E402
from model.train import _choose_trainable  # noqa: E402

GIB = 1024 ** 3


def estimate(preset: str) -> dict:
    with torch.device("meta"):
        net = build_net(preset_arch(preset))
    total = sum(p.numel() for p in net.parameters())
    out = {"params_M": round(total / 1e6, 1)}
    for parts in ("all", "prompt_decoder", "decoder"):
        _choose_trainable(net, parts)
        trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
        out[parts] = round((4 * total + 12 * trained) / GIB, 2)
        out[f"{parts}_trained_M"] = round(trained / 1e6, 2)
    return out


def main() -> None:
    table = {p: estimate(p) for p in family_presets()}
    print(f"{'preset':26s} {'params':>8s} {'all':>8s} {'prompt+dec':>10s} {'decoder':>8s}   (GiB: weights + grads + AdamW)")
    for p, r in table.items():
        print(f"{p:26s} {r['params_M']:7.1f}M {r['all']:8.2f} {r['prompt_decoder']:10.2f} {r['decoder']:8.2f}")
    print(json.dumps({p: {k: r[k] for k in ("params_M", "all", "prompt_decoder", "decoder")} for p, r in table.items()}))


if __name__ == "__main__":
    main()
