"""From-scratch training curve of the compact preset on the synthetic data (issue 3's headline figure).

Trains `Segmenter.new("compact")` for `--minutes` of this process's CPU time (`--clock cpu`, the
default: fair on a shared machine; wall time is reported beside it) or of wall time (`--clock wall`,
e.g. with `--procs 2`: what a user of the 2-core machine gets in that time, as two data-parallel
workers like Ray Train's; rank 0 keeps the clock and evaluates), and evaluates SAM's point protocol on a
held-out split (another seed of engine/integrations/synth.py) every `--eval-every` CPU-minutes; evaluation time
is not counted. The training scenes are a pool generated before the timer starts (`--pool`; its
generation time is printed); augmentation makes each reuse differ.

Last line: JSON with `miou_at_1_oracle`, `miou_at_1_pred`, `miou_box`, `cpu_minutes`,
`wall_minutes`, `steps`, `threads`, `procs` and `curve` (one entry per evaluation).

    .venv/bin/python benchmarks/train_curve.py --minutes 10 --out /tmp/ck
    .venv/bin/python benchmarks/train_curve.py --minutes 10 --clock wall --procs 2 --set crop_batch_images=32 batch_images=16
    .venv/bin/python benchmarks/train_curve.py --minutes 2 --set lr=3e-3 --arch out_stride=4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.integrations.synth import make_scene, scene_rng  # noqa: E402
from model.evaluate import click_eval  # noqa: E402
from model.segmenter import Segmenter  # noqa: E402
from model.train import TrainSettings, dataset_sampler, train  # noqa: E402


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set/--arch: expected key=value, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", "--cpu-minutes", type=float, default=10.0, help="training budget on --clock")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this process's CPU time; wall: elapsed training time")
    ap.add_argument("--eval-every", type=float, default=2.0, help="minutes (on --clock) between evaluations")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--procs", type=int, default=1,
                    help="data-parallel processes (gloo; rank 0 keeps the clock and evaluates; batch per process)")
    ap.add_argument("--pool", type=int, default=2000, help="training scenes generated before the timer")
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--holdout-seed", type=int, default=999)
    ap.add_argument("--holdout-images", type=int, default=12)
    ap.add_argument("--size", type=int, default=256, help="scene side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="model init and sampling seed")
    ap.add_argument("--set", nargs="*", default=[], help="TrainSettings overrides, key=value")
    ap.add_argument("--arch", nargs="*", default=[], help="compact architecture overrides, key=value (JSON values)")
    ap.add_argument("--out", default=None, help="save the trained checkpoint here")
    args = ap.parse_args()
    if args.procs > 1:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_worker, args=(args, port), nprocs=args.procs)
    else:
        run(args)


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.procs)
    try:
        run(args, rank)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int = 0) -> None:
    torch.set_num_threads(args.threads)
    if rank:
        sys.stdout = open(os.devnull, "w")

    known = {f.name for f in fields(TrainSettings)}
    sets = _overrides(args.set)
    bad = sorted(set(sets) - known)
    if bad:
        raise SystemExit(f"--set: unknown TrainSettings fields {bad}")
    settings = TrainSettings(**{**dict(minutes=args.minutes, clock=args.clock, threads=args.threads, seed=args.seed,
                                       eval_every_s=args.eval_every * 60), **sets})

    t0, c0 = time.perf_counter(), time.process_time()
    scenes = [make_scene(scene_rng(args.train_seed, i), args.size) for i in range(args.pool)]
    print(f"pool: {args.pool} scenes in {time.process_time() - c0:.1f} CPU-s ({time.perf_counter() - t0:.1f} s wall), "
          "before the timer", flush=True)
    holdout = [make_scene(scene_rng(args.holdout_seed, i), args.size) for i in range(args.holdout_images)]
    h_images, h_masks = [s[0] for s in holdout], [s[1] for s in holdout]

    seg = Segmenter.new("compact", seed=args.seed, **_overrides(args.arch))
    n_params = sum(p.numel() for p in seg.net.parameters())
    print(f"arch: {json.dumps(seg.arch)}  params: {n_params / 1e6:.2f} M", flush=True)
    print(f"settings: {json.dumps(settings.__dict__)}", flush=True)

    def on_eval(s: Segmenter) -> dict:
        m = click_eval(s, h_images, h_masks, clicks=1)
        row = {"oracle@1": round(m["oracle@1"], 4), "pred@1": round(m["pred@1"], 4), "box": round(m["box"], 4),
               "n_masks": m["n_masks"]}
        print(f"  eval: {json.dumps(row)}", flush=True)
        return row

    wall0 = time.perf_counter()
    result = train(seg, dataset_sampler([s[0] for s in scenes], [s[1] for s in scenes]), settings,
                   on_eval if rank == 0 else None)
    if rank:
        return
    wall = time.perf_counter() - wall0
    curve = [{"cpu_min": round(c["cpu_s"] / 60, 2), "wall_min": round(c["train_s"] / 60, 2), "step": c["step"],
              "oracle@1": c["oracle@1"], "pred@1": c["pred@1"], "box": c["box"]} for c in result.curve]
    print(f"{'CPU min':>8} {'wall min':>8} {'steps':>6} {'oracle@1':>9} {'pred@1':>7} {'box':>6}")
    for c in curve:
        print(f"{c['cpu_min']:8.2f} {c['wall_min']:8.2f} {c['step']:6d} {c['oracle@1']:9.3f} {c['pred@1']:7.3f} "
              f"{c['box']:6.3f}")
    if args.out:
        seg.save(args.out, {"round": 0, "data_fingerprint": f"synthetic-seed{args.train_seed}-pool{args.pool}",
                            "metrics": result.curve[-1], "train": {"steps": result.steps,
                                                                   "cpu_seconds": round(result.cpu_seconds, 1)}})
    last = result.curve[-1]
    print(json.dumps({
        "miou_at_1_oracle": last["oracle@1"], "miou_at_1_pred": last["pred@1"], "miou_box": last["box"],
        "cpu_minutes": round(result.cpu_seconds / 60, 2), "wall_minutes": round(result.train_seconds / 60, 2),
        "wall_minutes_with_eval": round(wall / 60, 2), "clock": args.clock, "steps": result.steps,
        "threads": args.threads, "procs": args.procs,
        "holdout": {"seed": args.holdout_seed, "images": args.holdout_images, "masks": last["n_masks"]},
        "pool": args.pool, "params_m": round(n_params / 1e6, 3), "curve": curve}))


if __name__ == "__main__":
    main()
