"""SAM's interactive training recipe, as a plain function (engine/retrain.py runs it as a round's retraining
step, in-process or on Ray Train).

Per sampled mask: a first prompt from the ground truth (a box with noise, or one point inside),
then `iterations - 1` corrective points sampled uniformly from the error region of the previous
prediction, with the previous low-res logits fed back as the mask prompt. Loss per step:
20·focal + 1·dice on the best of the 3 outputs (first step) or on the single output (later steps),
plus MSE between predicted and actual IoU. Masks carry weights (manual masks count more).
Augmentation: flips, 90° rotations, brightness/contrast jitter.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from model.clicks import interior_distance, sample_error_click, sample_point
from model.distributed import all_reduce_sum, world
from model.muon import Muon, split_params
from model.segmenter import Segmenter
# The samplers are part of train's API (callers import them from here)
from model.train_data import (_MEAN, _STD, Sample, Sampler, Scene, _batch, _flip_turn, _jitter, _window, augment,  # noqa: F401
                              buffered_sampler, dataset_sampler, input_frame_sampler, to_frame)

@dataclass
class TrainSettings:
    # The budget: `max_steps` optimiser steps (the same model on any machine, however busy). `minutes` on
    # `clock` (evaluation time not counted) is a guard that can stop training earlier; with no max_steps it is
    # the budget itself (benchmarks that measure rates). One of the two must be set.
    max_steps: int | None = None
    minutes: float | None = None
    clock: str = "wall"  # "wall" (perf_counter) or "cpu" (this process's CPU time: fair on a shared machine)
    batch_images: int = 8
    masks_per_image: int = 8
    iterations: int = 2  # prompts per mask: first prompt + corrective clicks
    corrective_share: float = 0.5  # share of a step's masks that get the corrective iterations
    focal_alpha: float = 0.5  # 0.5 = no class re-weighting (0.25 drives small objects to empty masks)
    focal_gamma: float = 2.0
    focal_weight: float = 20.0  # SAM: focal:dice = 20:1
    dice_weight: float = 1.0
    # Side of the loss grid: None = the decoder's native low-res grid (gt area-averaged; 4x cheaper
    # than SAM's upsampling to the input size for the compact preset, and it learned faster).
    loss_size: int | None = None
    first_point: str = "interior"  # "interior" (weighted by depth: what the evaluation clicks) or "uniform"
    single_click_fraction: float = 0.0  # share of the budget trained with the first prompt only
    ema_decay: float | None = 0.99  # evaluate/keep an exponential moving average of the weights (None: off)
    box_prob: float = 0.5
    lr: float = 8e-3  # from scratch (docs/model.md "Sixth pass"); a real SAM checkpoint wants ~1e-5
    lr_floor: float = 1.0  # the cosine decay ends at lr * lr_floor (1.0: constant after the warm-up)
    adam_beta2: float = 0.95  # AdamW's second-moment decay (measured: 0.95 beat 0.999 from scratch)
    optimizer: str = "muon"  # "muon": Muon for weight matrices and conv kernels, AdamW for the rest
    muon_lr_scale: float = 1.0  # Muon's rate = lr * this (its steps are scaled to AdamW's RMS)
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    min_area: int = 16  # masks smaller than this (pixels of the encoder input) are skipped
    seed: int = 0
    eval_every_s: float | None = None  # call `on_eval` this often (training seconds)
    # Crops (conv encoders only): the first `crop_share` of the budget trains on square windows of
    # `crop_fraction` of the input side (whole embedding cells; the decoder sees only the window's
    # cells, with their own positional encodings), `crop_batch_images` windows per step. 0: off.
    crop_fraction: float = 0.5
    crop_share: float = 0.75
    crop_batch_images: int = 16
    threads: int | None = None
    # Which parts learn: "all", "prompt_decoder" (the image encoder frozen: it runs without gradients),
    # "decoder" (the mask decoder only), or "auto": all for SAM-architecture models (the compact one, SAM 1), the
    # decoder for SAM 2 / SAM-HQ / SAM 3's tracker (a 30 M-600 M parameter pretrained encoder is a GPU job to
    # train, and the decoder is where a new domain's masks are learned first; docs/models.md).
    parts: str = "auto"


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    cpu_seconds: float
    final_loss: float
    curve: list[dict] = field(default_factory=list)  # {"train_s", "cpu_s", "step", **eval metrics}
    planned_steps: int | None = None  # settings.max_steps
    stopped_by: str = "steps"  # "steps": the budget was trained; "minutes": the clock guard stopped it first

    @property
    def short(self) -> bool:
        """Whether the clock guard stopped training before its planned steps (a result not comparable)."""
        return self.planned_steps is not None and self.steps < self.planned_steps


# ---- loss ------------------------------------------------------------------------------------

def _focal(logits: torch.Tensor, gt: torch.Tensor, alpha: float, gamma: float = 2.0) -> torch.Tensor:
    """(P, M, H, W) logits, (P, 1, H, W) float gt in [0, 1] -> (P, M) mean focal loss."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, gt.expand_as(logits), reduction="none")
    p_t = prob * gt + (1 - prob) * (1 - gt)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * gt + (1 - alpha) * (1 - gt)) * loss
    return loss.mean((-2, -1))


def _dice(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid()
    num = 2 * (prob * gt).sum((-2, -1))
    den = prob.sum((-2, -1)) + gt.sum((-2, -1))
    return 1 - (num + 1) / (den + 1)


def _step_loss(low: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor, w: torch.Tensor, side: int,
               s: "TrainSettings"):
    """Loss of one decoding step; returns (loss, index of the best output per row, its logits (P, 1, n, n)).

    low: (P, M, n, n) native logits; gt: (P, S, S) bool in the input frame. The loss grid is the
    native grid (None) or `s.loss_size` (logits resized; gt area-averaged to soft targets, or as is
    at the input size, SAM's choice).
    """
    size = s.loss_size or low.shape[-1]
    if size == side:
        up, g = F.interpolate(low, (side, side), mode="bilinear", align_corners=False), gt[:, None].float()
    else:
        up = low if low.shape[-1] == size else F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
        g = F.adaptive_avg_pool2d(gt[:, None].float(), size)
    per = s.focal_weight * _focal(up, g, s.focal_alpha, s.focal_gamma) + s.dice_weight * _dice(up, g)  # (P, M)
    best = per.argmin(1)
    rows = torch.arange(len(best), device=best.device)
    with torch.no_grad():
        hard, gh = up > 0, g > 0.5
        inter = (hard & gh).sum((-2, -1)).float()
        union = (hard | gh).sum((-2, -1)).float()
        actual = inter / union.clamp(min=1)
    iou_loss = F.mse_loss(iou_pred, actual, reduction="none").mean(1)
    per_row = per[rows, best] + iou_loss
    loss = (per_row * w).sum() / w.sum()
    return loss, best, low[rows, best][:, None]


# ---- the loop --------------------------------------------------------------------------------

def _allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients across data-parallel workers (no-op in a single process)."""
    workers = world()[1]
    if workers == 1:
        return
    # Zeros for unused parameters, so every rank makes the same single call (a box-prompted step
    # on one rank leaves other prompt embeddings without grads than a point step).
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    all_reduce_sum(grads)
    torch._foreach_div_(grads, workers)


class _Ema:
    """Exponential moving average of a network's parameters and buffers (BatchNorm statistics)."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [t.detach().clone() for t in self._tensors(net)]

    @staticmethod
    def _tensors(net: torch.nn.Module) -> list[torch.Tensor]:
        return [t for t in list(net.parameters()) + list(net.buffers()) if t.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        # Short effective horizon early on, so the average does not drag the random init along.
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [t.detach() for t in self._tensors(net)], 1 - d)

    @torch.no_grad()
    def swap(self, net: torch.nn.Module) -> None:
        """Exchange the live weights with the averaged ones (call twice to restore)."""
        for live, avg in zip(self._tensors(net), self.shadow):
            tmp = live.clone()
            live.copy_(avg)
            avg.copy_(tmp)


def _optimisers(net: torch.nn.Module, s: TrainSettings) -> list[torch.optim.Optimizer]:
    """AdamW over every trainable parameter, or Muon over the weight matrices and AdamW over the rest.
    Each param group carries `lr_scale` (its rate = the schedule's rate times it)."""
    params = [p for p in net.parameters() if p.requires_grad]
    rest, out = params, []
    if s.optimizer == "muon":
        matrices, rest = split_params(net)
        out.append(Muon([dict(params=matrices, lr_scale=s.muon_lr_scale)], lr=s.lr * s.muon_lr_scale,
                        weight_decay=s.weight_decay))
    elif s.optimizer != "adamw":
        raise ValueError(f"train settings: optimizer must be 'adamw' or 'muon', got {s.optimizer!r}")
    # fused: one kernel for all parameters (1.4 vs 6.6 ms a step on this CPU for the compact model)
    out.append(torch.optim.AdamW([dict(params=rest, lr_scale=1.0)], lr=s.lr, weight_decay=s.weight_decay,
                                 betas=(0.9, s.adam_beta2), fused=True))
    return out


def learning_rate(s: TrainSettings, step: int, progress: float | None) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from `lr` to `lr * lr_floor` over the
    budget; progress: share of the budget spent in [0, 1], None for no decay (a step-count run)."""
    lr = s.lr * min(1.0, (step + 1) / s.warmup_steps)
    if progress is not None:
        lr *= s.lr_floor + (1 - s.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def train(seg: Segmenter, data: Sampler, settings: TrainSettings | None = None,
          on_eval: Callable[[Segmenter], dict] | None = None) -> TrainResult:
    """Train `seg` in place on `data` (see `dataset_sampler`, `synthetic_sampler`) for `max_steps` optimiser
    steps (the learning-rate schedule and crop share run on steps: the same settings and seed give the same
    model on an idle laptop and a busy machine), stopped earlier only by the `minutes` guard (`stopped_by`).

    `minutes` and `eval_every_s` count on `settings.clock`; the curve records both
    wall and process-CPU seconds. With `ema_decay`, the averaged weights are evaluated and kept.
    The network runs at the segmenter's precision (`Segmenter.run_as`: fp32 or bf16 autocast).
    """
    s = settings or TrainSettings()
    if s.clock not in ("wall", "cpu"):
        raise ValueError(f"train settings: clock must be 'wall' or 'cpu', got {s.clock!r}")
    if s.max_steps is None and s.minutes is None:
        raise ValueError("train settings: set max_steps (the budget, optimiser steps) or minutes")
    if seg.precision == "fp16":
        raise ValueError("train: fp16 needs loss scaling, which this recipe does not do; train in fp32 or bf16")
    if s.threads:
        torch.set_num_threads(s.threads)
    rng = np.random.default_rng(s.seed + 1000 * world()[0])
    # Box or point steps are drawn alike on every data-parallel worker: a point step costs more
    # (first points by depth), and each step waits for the slowest worker.
    prompt_rng = np.random.default_rng([s.seed, 1])
    torch.manual_seed(s.seed)
    net, side = seg.net, seg.image_size
    stride = side // net.embed_size
    crop_px = None
    if s.crop_share > 0 and seg.arch.get("encoder") == "compact":  # a ViT needs its whole input
        if not 0 < s.crop_fraction <= 1:
            raise ValueError(f"train settings: crop_fraction must be in (0, 1], got {s.crop_fraction}")
        crop_px = max(1, round(s.crop_fraction * net.embed_size)) * stride
    parts = s.parts if s.parts != "auto" else ("all" if seg.family == "sam" else "decoder")
    frozen = _choose_trainable(net, parts)
    params = [p for p in net.parameters() if p.requires_grad]
    opts = _optimisers(net, s)
    ema = _Ema(net, s.ema_decay) if s.ema_decay else None
    data = input_frame_sampler(data, side, net.resize)
    budget = math.inf if s.minutes is None else s.minutes * 60
    curve: list[dict] = []
    train_s, cpu_s, step, last_eval, loss_v = 0.0, 0.0, 0, 0.0, float("nan")

    def spent() -> float:
        return cpu_s if s.clock == "cpu" else train_s

    def evaluate_now():
        if on_eval is None:
            return
        net.eval()
        if ema is not None and step:
            ema.swap(net)
        metrics = on_eval(seg)
        if ema is not None and step:
            ema.swap(net)
        curve.append({"train_s": round(train_s, 1), "cpu_s": round(cpu_s, 1), "step": step, **metrics})
        net.train()

    evaluate_now()
    net.train()
    while True:
        t0, c0 = time.perf_counter(), time.process_time()
        done = spent() >= budget or (s.max_steps is not None and step >= s.max_steps)
        progress = min(1.0, spent() / budget) if s.max_steps is None else step / s.max_steps
        done, progress = _rank0_decides(done, progress, seg.device)
        if done:
            break
        lr = learning_rate(s, step, progress if s.max_steps is None else None)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
        iterations = 1 if progress < s.single_click_fraction else s.iterations
        crop = crop_px if (crop_px and progress < s.crop_share) else None
        use_box = bool(prompt_rng.random() < s.box_prob)
        if frozen:
            frozen.eval()  # a frozen encoder keeps its normalisation statistics
        loss_v = _train_step(seg, opts, params, data, rng, s, side, iterations, crop, use_box, frozen is not None)
        if ema is not None:
            ema.update(net, step)
        step += 1
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        if s.eval_every_s and spent() - last_eval >= s.eval_every_s:
            last_eval = spent()
            evaluate_now()
    if s.eval_every_s and not (curve and curve[-1]["step"] == step):
        evaluate_now()
    if ema is not None and step:
        ema.swap(net)  # keep the averaged weights
    net.eval()
    stopped_by = "steps" if s.max_steps is not None and step >= s.max_steps else "minutes"
    return TrainResult(step, train_s, cpu_s, loss_v, curve, s.max_steps, stopped_by)


def _first_points(gt: np.ndarray, rng: np.random.Generator, how: str) -> list[tuple[int, int]]:
    """One (x, y) per (P, S, S) mask: uniform inside, or ("interior") with probability proportional to
    the distance from the boundary, which favours the deep points the evaluation clicks first."""
    if how == "uniform":
        return [sample_point(m, rng) for m in gt]
    if how != "interior":
        raise ValueError(f"train settings: first_point must be 'uniform' or 'interior', got {how!r}")
    out = []
    for m in gt:
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        y0, x0 = rows[0], cols[0]
        d = interior_distance(m[y0:rows[-1] + 1, x0:cols[-1] + 1])
        cdf = np.cumsum(d.ravel())
        i = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
        y, x = divmod(i, d.shape[1])
        out.append((int(x0 + x), int(y0 + y)))
    return out


def _train_step(seg: Segmenter, opts: list[torch.optim.Optimizer], params, data: Sampler, rng: np.random.Generator, s: TrainSettings, side: int,
                iterations: int | None = None, crop: int | None = None, use_box: bool = False,
                encoder_frozen: bool = False) -> float:
    net = seg.net
    iterations = iterations or s.iterations
    stride = side // net.embed_size
    pixels, gt, w, owner, offsets = _batch(data, rng, s, side, crop, stride, net.resize)
    gt_np = gt.numpy()
    dev = seg.device  # the batch is made on the host; the network runs where the segmenter lives
    pixels, gt, w = pixels.to(dev, non_blocking=True), gt.to(dev, non_blocking=True), w.to(dev)
    with seg.autocast(), torch.set_grad_enabled(not encoder_frozen):  # the segmenter's precision
        out = net.image_encoder(pixels)
    # (P, C, h, w) per mask, and the family's extra per-image features likewise (SAM 2, SAM-HQ)
    out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    feats, extras = out[0].float()[owner], tuple(e.float()[owner] for e in out[1:])
    frame = gt.shape[-1]
    pe = shift = None
    if crop:
        # The window's own cells of the whole grid's positional encoding, and prompts moved back
        # to whole-input coordinates, so the decoder sees what it sees at inference.
        full, c = net.dense_pe()[0], crop // stride
        pe = torch.stack([full[:, oy // stride:oy // stride + c, ox // stride:ox // stride + c]
                          for ox, oy in offsets.tolist()])[owner]
        shift = offsets[owner].float().to(dev)
    n = len(gt_np)
    boxes = None
    pts: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    labs: list[list[int]] = [[] for _ in range(n)]
    if use_box:
        b = np.zeros((n, 4), np.float32)
        for i, m in enumerate(gt_np):
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            noise = rng.normal(0, 0.1, 4) * np.array([x1 - x0, y1 - y0] * 2)
            b[i] = np.clip(np.array([x0, y0, x1, y1]) + np.clip(noise, -20, 20), 0, frame)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        boxes = torch.from_numpy(b)
    else:
        for i, xy in enumerate(_first_points(gt_np, rng, s.first_point)):
            pts[i].append(xy)
            labs[i].append(1)
    total = 0.0
    mask_in = None
    rows = np.arange(n)  # the masks still being refined (indices into pts/labs/gt_np)
    for it in range(iterations):
        if it == 1 and s.corrective_share < 1.0:
            # Corrective iterations on a random share of the masks: the first prompt is what most
            # decoder time buys, and the single-output/mask-prompt path still gets trained.
            keep = np.sort(rng.choice(n, size=max(1, round(n * s.corrective_share)), replace=False))
            k = torch.as_tensor(keep)
            rows, mask_in, feats, gt, w = rows[keep], mask_in[k], feats[k], gt[k], w[k]
            extras = tuple(e[k] for e in extras)
            boxes = None if boxes is None else boxes[k]
        points = labels = None
        if pts[rows[0]]:
            points = torch.tensor([pts[i] for i in rows], dtype=torch.float32)
            labels = torch.tensor([labs[i] for i in rows], dtype=torch.int64)
        bx = boxes
        if shift is not None:
            sh = shift[torch.as_tensor(rows)]
            points = None if points is None else points + sh[:, None]
            bx = None if boxes is None else boxes + sh.repeat(1, 2)
            p_rows = pe[torch.as_tensor(rows)]
        low, iou = seg.decode(feats, points, labels, bx, mask_in, multimask=(it == 0),
                              pe=None if shift is None else p_rows, extras=extras)
        loss, _, chosen = _step_loss(low, iou, gt, w, frame, s)
        total = total + loss
        if it + 1 < iterations:
            with torch.no_grad():
                mask_in = chosen.detach()
                pred = (F.interpolate(mask_in, (frame, frame), mode="bilinear", align_corners=False)[:, 0] > 0).cpu().numpy()
            for j, i in enumerate(rows):
                x, y, lab = sample_error_click(pred[j], gt_np[i], rng)
                pts[i].append((x, y))
                labs[i].append(lab)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    (total / iterations).backward()
    _allreduce_grads(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for opt in opts:
        opt.step()
    return float(total.detach()) / iterations


TRAIN_PARTS = ("auto", "all", "prompt_decoder", "decoder")


def _choose_trainable(net: torch.nn.Module, parts: str) -> torch.nn.Module | None:
    """Set requires_grad by `parts` (TRAIN_PARTS); returns the frozen image encoder module (None: it trains).
    Parts by parameter name: the image encoder ("image_encoder.", transformers' "model.vision_encoder."), the
    prompt encoder and positional encodings, the mask decoder (with SAM 2's no-memory token)."""
    if parts not in TRAIN_PARTS:
        raise ValueError(f"train settings: parts must be one of {TRAIN_PARTS}, got {parts!r}")
    encoder = ("image_encoder.", "model.vision_encoder.")
    decoder = ("mask_decoder.", "model.mask_decoder.", "model.no_memory_embedding")
    for name, p in net.named_parameters():
        if parts == "all":
            p.requires_grad_(True)
        elif parts == "prompt_decoder":
            p.requires_grad_(not name.startswith(encoder))
        else:
            p.requires_grad_(name.startswith(decoder))
    if parts == "all":
        return None
    return net.model.vision_encoder if hasattr(net, "model") else net.image_encoder


def _rank0_decides(done: bool, progress: float, device: torch.device) -> tuple[bool, float]:
    """Rank 0's clock decides, for every worker, when to stop and where the schedule is: workers
    whose clocks disagree by one step would leave one of them alone in an all-reduce (a hang).
    device: where the collective's tensors live (NCCL takes GPU tensors only)."""
    if world()[1] == 1:
        return done, progress
    state = torch.tensor([float(done), progress], dtype=torch.float64, device=device)
    dist.broadcast(state, 0)
    return bool(state[0]), float(state[1])
