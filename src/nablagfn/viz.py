"""Figures written into a run directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_vector_samples(panels: dict[str, Tensor], path: Path, title: str = "") -> Path:
    """Side-by-side scatter plots (first two coordinates) sharing one frame."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), sharex=True, sharey=True)
    for axis, (name, points) in zip(axes, panels.items()):
        points = points.detach().cpu()
        axis.scatter(points[:, 0], points[:, 1], s=2, alpha=0.35)
        axis.set_title(name)
        axis.set_aspect("equal")
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.95) if title else None)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def tile_images(images: Tensor, columns: int = 8, pad: int = 1) -> Tensor:
    """(N, C, H, W) in [0, 1] → one (H', W', C) grid image with ``pad`` white pixels between tiles."""
    images = images.detach().float().cpu().clamp(0, 1)
    count, channels, height, width = images.shape
    rows = -(-count // columns)
    grid = images.new_ones(channels, rows * (height + pad) + pad, columns * (width + pad) + pad)
    for index, image in enumerate(images):
        top, left = pad + (index // columns) * (height + pad), pad + (index % columns) * (width + pad)
        grid[:, top : top + height, left : left + width] = image
    return grid.permute(1, 2, 0)


def plot_image_grids(panels: dict[str, Tensor], path: Path, title: str = "", columns: int = 8) -> Path:
    """Side-by-side grids of images in [0, 1] (grayscale shown in gray levels, 0 = black)."""
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    for axis, (name, images) in zip(axes[0], panels.items()):
        grid = tile_images(images, columns)
        axis.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
                    interpolation="nearest")
        axis.set_title(name, fontsize=10)
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_training_curves(records: list[dict], path: Path, keys: list[str]) -> Path | None:
    """One panel per metric key found in the run's metrics.jsonl records, against the update number."""
    present = [key for key in keys if any(key in record for record in records)]
    if not present:
        return None
    columns = min(3, len(present))
    rows = -(-len(present) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat[len(present):]:
        axis.axis("off")
    for axis, key in zip(axes.flat, present):
        points = [(record["update"], record[key]) for record in records if key in record]
        axis.plot([u for u, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None)
        axis.set_xlabel("update")
        axis.set_title(key, fontsize=10)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
