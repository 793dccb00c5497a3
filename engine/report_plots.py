"""The report's plots (matplotlib, Agg): holdout mIoU by round, annotation cost, masks per image, scores and a
gallery of masks overlaid (engine/report.py writes them beside report.md)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from engine.integrations import runtime
from engine.integrations.config import EngineConfig
from storage.images import BadImage
from storage.rle import decode_rles

STAGE_COLORS = {"manual": "#1f77b4", "semi": "#ff7f0e", "auto": "#2ca02c"}


def _plt():
    import matplotlib  # deferred: the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def plot_miou(points: list[dict], clicks: list[int], path: Path) -> bool:
    if not points:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    xs = [p["round"] for p in points]
    for k, shade in zip(clicks, ("#08306b", "#2171b5", "#6baed6", "#9ecae1")):
        ys = [p["in_use"].get(f"miou@{k}") for p in points]
        ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", color=shade,
                label=f"model in use, {k} click{'s' if k > 1 else ''}")
    first = f"miou@{clicks[0]}"
    rejected = [(p["round"], p["candidate"].get(first)) for p in points if p["promoted"] is False]
    if rejected:
        ax.scatter(*zip(*rejected), marker="x", s=60, color="#d62728", zorder=3,
                   label=f"rejected candidate ({clicks[0]} click{'s' if clicks[0] > 1 else ''})")
        for x, y in rejected:
            if y is not None:
                ax.annotate("kept", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7,
                            color="#d62728")
    ax.set_xlabel("after round (0 = starting model)")
    ax.set_ylabel("holdout mIoU")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    ax.set_title("Holdout mIoU of the model in use")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_cost(rows: list[dict], path: Path) -> bool:
    human = [r for r in rows if r["stage"] in ("manual", "semi") and r["clicks_per_mask"] is not None]
    if not human:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.2))
    xs = [f"r{r['round']}\n{r['stage']}" for r in human]
    colors = [STAGE_COLORS[r["stage"]] for r in human]
    for ax, key, title in ((axes[0], "clicks_per_mask", "clicks per mask"),
                           (axes[1], "seconds_per_mask", "seconds per mask")):
        vals = [r[key] or 0 for r in human]
        ax.bar(xs, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="x", visible=False)
    fig.suptitle("Annotation cost per round", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_masks_per_image(rows: list[dict], path: Path) -> bool:
    done = [r for r in rows if r["masks_per_image"] is not None]
    if not done:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    xs = [f"r{r['round']}\n{r['stage']}" for r in done]
    vals = [r["masks_per_image"] for r in done]
    ax.bar(xs, vals, color=[STAGE_COLORS[r["stage"]] for r in done])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("masks per image")
    ax.set_title("Masks per image by round and stage")
    ax.grid(axis="x", visible=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_scores(masks, path: Path) -> bool:
    scored = masks[masks["predicted_iou"].notna()] if len(masks) else masks
    if not len(scored):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for ax, col, title in ((axes[0], "predicted_iou", "predicted IoU"),
                           (axes[1], "stability_score", "stability score")):
        low = scored[col].dropna().astype(float).min()
        bins = np.linspace(math.floor(min(low, 0.95) * 20) / 20, 1.0, 31)
        for stage in ("semi", "auto"):
            vals = scored.loc[scored["stage"] == stage, col].dropna().astype(float)
            if len(vals):
                ax.hist(vals, bins=bins, alpha=0.7, color=STAGE_COLORS[stage],
                        label=f"{stage} (n={len(vals)}, median {np.median(vals):.3f})")
        ax.set_title(title)
        ax.set_ylabel("masks")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Scores of model-made masks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _overlay(pixels: np.ndarray, masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """pixels (H, W, 3) uint8, masks (N, H, W) bool -> (H, W, 3) uint8 with each mask tinted and outlined.

    Larger masks are painted first so small ones stay visible on top.
    """
    out = pixels.astype(np.float32)
    rng = np.random.default_rng(seed)
    order = np.argsort([-m.sum() for m in masks])
    for i in order:
        m = masks[i]
        color = rng.uniform(40, 255, size=3)
        out[m] = 0.45 * out[m] + 0.55 * color
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = color * 0.6
    return out.clip(0, 255).astype(np.uint8)


def plot_gallery(cfg: EngineConfig, store, masks, path: Path, n_images: int) -> list[str]:
    """Up to `n_images` images with the masks of their latest stage overlaid. Returns the image ids shown."""
    if not len(masks) or n_images <= 0:
        return []
    # show the stage that covers an image last (auto > semi > manual), images with the most masks first
    rank = {"manual": 0, "semi": 1, "auto": 2}
    last = masks.assign(rank=masks["stage"].map(rank)).groupby("image_id")["rank"].max()
    counts = masks.assign(rank=masks["stage"].map(rank)).merge(last.rename("last"), on="image_id")
    counts = counts[counts["rank"] == counts["last"]].groupby(["image_id", "stage"]).size()
    counts = counts.reset_index(name="n").sort_values(["n", "image_id"], ascending=[False, True])
    picks = counts.head(n_images)
    src = runtime.image_source(cfg)
    panels = []
    for image_id, stage, n in picks.itertuples(index=False):
        table = store.read_table(columns=["rle", "height", "width"], stage=stage, image_ids=[image_id])
        rles = [{"size": [h, w], "counts": c} for c, h, w in zip(table.column("rle").to_pylist(),
                                                                 table.column("height").to_pylist(),
                                                                 table.column("width").to_pylist())]
        decoded = decode_rles(rles)
        try:
            pixels = src.load(src.ref(image_id)).pixels
        except BadImage:  # gone or unreadable since: show the next one
            continue
        if pixels.shape[:2] != decoded.shape[1:]:  # the image was downscaled for the model; masks are full size
            pixels = np.asarray(Image.fromarray(pixels).resize((decoded.shape[2], decoded.shape[1]), Image.BILINEAR))
        panels.append((image_id, stage, n, _overlay(pixels, decoded, seed=len(panels))))
    if not panels:
        return []
    plt = _plt()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_id, stage, n, img) in zip(axes.flat, panels):
        ax.imshow(img)
        ax.set_title(f"{image_id[:14]}\n{stage}: {n} masks", fontsize=7)
    fig.suptitle("Masks overlaid (each image shows its latest stage)", fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return [p[0] for p in panels]
