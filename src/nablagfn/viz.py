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
