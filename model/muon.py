"""Muon: momentum whose update is orthogonalised (Newton–Schulz) before it is applied, for weight matrices.

Keller Jordan's optimiser (kellerjordan.github.io/posts/muon). A matrix's update is replaced by the
nearest semi-orthogonal matrix (all singular values ~1), so every direction of the layer moves at
the same rate instead of the few that dominate the gradient. Conv kernels (out, in, kh, kw) are
treated as (out, in·kh·kw) matrices. Vectors, embeddings and norms stay with AdamW (`split_params`).

`torch.optim.Muon` exists but takes 2-D parameters only and iterates in bfloat16, which AVX2 CPUs
run slower than float32; this one is float32 on every CPU (so results do not depend on the CPU: an
AMX CPU ran the largest bf16 batch in 7.8 ms vs 17.8 ms) and takes conv kernels.
"""
from __future__ import annotations

import math

import torch

from model.distributed import all_reduce_sum, world

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic: the steepest slope at zero that still settles


def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """(..., A, B) matrices -> ~U V^T of each one's SVD (singular values pushed into ~[0.7, 1.2]), float32."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) with orthogonalised updates, scaled to AdamW's update size.

    The step of a (A, B) matrix is lr · 0.2·sqrt(max(A, B)) · orthogonalise(momentum), which has
    about the RMS of an AdamW step of the same lr ("match_rms_adamw"), so the two share one rate.
    Decoupled weight decay as AdamW's. Under torch.distributed, the workers (which must hold the
    same gradients, as after an all-reduce) split the Newton–Schulz work between them by shape.
    """

    def __init__(self, params, lr: float = 4e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"muon: parameters must be matrices or conv kernels, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        rank, workers = world()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[tuple[int, int], list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].get("momentum")
                if buf is None:
                    buf = self.state[p]["momentum"] = torch.zeros_like(p)
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom).reshape(p.shape[0], -1)  # Nesterov
                by_shape.setdefault(tuple(update.shape), []).append((p, update))
            # Matrices of one shape are orthogonalised together (one batched matmul per iteration);
            # data-parallel workers hold the same momenta, so each orthogonalises its share of the
            # shapes and one all-reduce hands every worker all of them.
            owner = share_work({k: ns_cost(k, len(v)) for k, v in by_shape.items()}, workers)
            ortho = {k: orthogonalise(torch.stack([u for _, u in items]), group["ns_steps"]) if owner[k] == rank
                     else torch.zeros(len(items), *k, device=items[0][1].device) for k, items in by_shape.items()}
            all_reduce_sum(list(ortho.values()))
            for (rows, cols), items in by_shape.items():
                for (p, _), o in zip(items, ortho[(rows, cols)]):
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(o.view_as(p), alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))


def ns_cost(shape: tuple[int, int], count: int) -> int:
    """Multiply-adds of one Newton–Schulz iteration over `count` (A, B) matrices: 2·a²·b + a³, a = min(A, B)."""
    a, b = sorted(shape)
    return count * (2 * a * a * b + a ** 3)


def share_work(costs: dict, workers: int) -> dict:
    """Each key -> the worker (0..workers-1) that does it: dearest first, to the least-loaded worker.
    Deterministic in the keys and costs, so every worker computes the same assignment."""
    load = [0] * workers
    owner = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        w = min(range(workers), key=lambda i: (load[i], i))
        owner[key] = w
        load[w] += costs[key]
    return owner


def split_params(net: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(matrices for Muon, the rest for AdamW): weights of Linear, Conv and ConvTranspose layers
    go to Muon; biases, norms, embedding tables and SAM's learned tokens to AdamW."""
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    matrices = {id(m.weight) for m in net.modules() if isinstance(m, layers) and m.weight.requires_grad}
    params = [p for p in net.parameters() if p.requires_grad]
    return [p for p in params if id(p) in matrices], [p for p in params if id(p) not in matrices]
