"""The torch.distributed edge of training: who this worker is, and sums across data-parallel workers.

Both are no-ops in a single process (torch.distributed not initialised, or one worker), so the
training code reads the same whether it runs alone, under `benchmarks/train_curve.py --procs`, or
as a Ray Train worker (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the workers, in place, through one flat buffer (one call, however many
    tensors). Every worker must pass tensors of the same shapes in the same order."""
    if world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
