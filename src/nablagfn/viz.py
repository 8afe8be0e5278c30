"""Figures written into a run directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def _panel_axes(count: int, per_row: int | None, width: float, height: float, **kwargs):
    """A figure with ``count`` panels, ``per_row`` to a row (None: one row); the unused axes switched off."""
    columns = min(count, per_row or count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False, **kwargs)
    for axis in axes.flat[count:]:
        axis.axis("off")
    return figure, list(axes.flat[:count])


def plot_vector_samples(
    panels: dict[str, Tensor], path: Path, title: str = "", panels_per_row: int | None = None
) -> Path:
    """Scatter plots (first two coordinates) sharing one frame, side by side (``panels_per_row`` to a row)."""
    figure, axes = _panel_axes(len(panels), panels_per_row, 4, 4.2, sharex=True, sharey=True)
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


def plot_image_grids(
    panels: dict[str, Tensor], path: Path, title: str = "", columns: int = 8, panels_per_row: int | None = None
) -> Path:
    """Grids of images in [0, 1] (grayscale shown in gray levels, 0 = black), side by side (``panels_per_row`` to a
    row; ``columns`` images to a grid row)."""
    grids = {name: tile_images(images, columns) for name, images in panels.items()}
    aspect = max(grid.shape[0] / grid.shape[1] for grid in grids.values())  # height / width of the tallest grid
    figure, axes = _panel_axes(len(panels), panels_per_row, 3.6, 3.6 * aspect + 0.5)
    for axis, (name, grid) in zip(axes, grids.items()):
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


def plot_training_curves(records: list[dict], path: Path, keys: list[str],
                         references: dict[str, tuple[float, str]] | None = None) -> Path | None:
    """One panel per metric key found in the run's metrics.jsonl records, against the update number. Each ``eval/``
    panel also draws its value at update 0 (the pretrained model) as a dotted line, and ``references`` (key →
    (value, label)) as dashed lines."""
    present = [key for key in keys if any(record.get(key) is not None for record in records)]
    if not present:
        return None
    references = references or {}
    columns = min(3, len(present))
    rows = -(-len(present) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat[len(present):]:
        axis.axis("off")
    for axis, key in zip(axes.flat, present):
        points = [(record["update"], record[key]) for record in records if record.get(key) is not None]  # null: NaN
        axis.plot([u for u, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None)
        start = [value for update, value in points if update == 0]
        if key.startswith("eval/") and start and len(points) > 1:
            axis.axhline(start[0], color="gray", linestyle=":", linewidth=1, label="pretrained (update 0)")
        if key in references:
            value, label = references[key]
            axis.axhline(value, color="tab:green", linestyle="--", linewidth=1, label=label)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
        axis.set_xlabel("update")
        axis.set_title(key, fontsize=10)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def method_colors(names: list[str]) -> dict[str, tuple]:
    """One distinct colour per name (tab10, then the lighter half of tab20), stable for a given order."""
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("tab20")(i) for i in range(1, 20, 2)]
    return {name: palette[index % len(palette)] for index, name in enumerate(names)}


def plot_method_curves(
    curves: dict[str, dict[str, dict[str, list[float]]]], labels: dict[str, str], path: Path, title: str = ""
) -> Path | None:
    """Metrics against update step (left) and wall time (right), one row per metric and one colour per method.

    ``curves[method][key]`` holds equal-length lists ``update``, ``time`` (seconds), ``mean`` and ``std`` (the
    spread over seeds, NaN where a single seed); ``labels`` maps each metric key to its panel title, in row order."""
    keys = [key for key in labels if any(key in per_method for per_method in curves.values())]
    if not keys:
        return None
    colors = method_colors(list(curves))
    figure, axes = plt.subplots(len(keys), 2, figsize=(11, 3.0 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        for column, x_name in enumerate(("update", "time")):
            axis = axes[row][column]
            for method, per_method in curves.items():
                if key not in per_method:
                    continue
                curve = per_method[key]
                x, mean, std = curve[x_name], curve["mean"], curve["std"]
                axis.plot(x, mean, color=colors[method], label=method, marker="o" if len(x) < 30 else None,
                          markersize=3)
                low = [m - (s if s == s else 0.0) for m, s in zip(mean, std)]  # s == s: not NaN
                high = [m + (s if s == s else 0.0) for m, s in zip(mean, std)]
                axis.fill_between(x, low, high, color=colors[method], alpha=0.18, linewidth=0)
            axis.set_xlabel("update" if x_name == "update" else "training wall time (s)")
            axis.set_title(labels[key], fontsize=10)
            axis.grid(alpha=0.3)
    figure.tight_layout()
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(6, len(names)),
                  fontsize=9, title=title or None, title_fontsize=10, frameon=False)
    figure.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps the legend above the panels
    plt.close(figure)
    return path


def plot_pareto(
    runs: dict[str, list[list[dict[str, float]]]],
    y_key: str,
    x_keys: list[str],
    labels: dict[str, str],
    path: Path,
    reference: dict[str, float] | None = None,
    title: str = "",
) -> Path | None:
    """Trade-off scatter plots: ``y_key`` against each of ``x_keys``, one point per evaluated checkpoint.

    ``runs[method]`` lists the runs of a method, each the evaluations of one run in update order (dicts holding the
    metric keys); a faint line joins a run's checkpoints, later ones drawn larger. ``reference`` (e.g. the
    pretrained model) is drawn as a black star."""
    if not x_keys:
        return None
    colors = method_colors(list(runs))
    figure, axes = _panel_axes(len(x_keys), None, 5.0, 4.4)
    for axis, x_key in zip(axes, x_keys):
        for method, method_runs in runs.items():
            labelled = False
            for evaluations in method_runs:
                points = [(e[x_key], e[y_key]) for e in evaluations if x_key in e and y_key in e]
                if not points:
                    continue
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                axis.plot(xs, ys, color=colors[method], alpha=0.3, linewidth=0.8)
                sizes = [12 + 36 * (index + 1) / len(points) for index in range(len(points))]
                axis.scatter(xs, ys, s=sizes, color=colors[method], alpha=0.8, edgecolors="none",
                             label=None if labelled else method)
                labelled = True
        if reference is not None and x_key in reference and y_key in reference:
            axis.scatter([reference[x_key]], [reference[y_key]], marker="*", s=160, color="black",
                         label="pretrained", zorder=5)
        axis.set_xlabel(labels.get(x_key, x_key))
        axis.set_ylabel(labels.get(y_key, y_key))
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    legend = {}  # one entry per method, whichever panel it appears in
    for axis in axes:
        for handle, name in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    figure.legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                  frameon=False)
    figure.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps the legend right of the panels
    plt.close(figure)
    return path
