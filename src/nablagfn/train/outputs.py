"""What a finished training writes beside its checkpoints and log: ``eval.json``, ``samples.png``, ``curves.png``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import atomic_write_text, strict_json
from .run import Run

#: the curves drawn in curves.png, where the log has them
CURVE_KEYS = ["eval/log_reward_mean", "sample/log_reward_mean", "eval/mode_tv", "eval/class_accuracy",
              "eval/fd_to_class", "eval/diversity", "eval/fid_to_pretrained", "loss"]
#: samples drawn per panel of samples.png
VECTOR_SAMPLES, IMAGE_SAMPLES = 4000, 64


def write_run_outputs(run: Run, run_dir: Path, evaluation: dict[str, float], progress: bool = False
                      ) -> dict[str, Path]:
    """Write the final evaluation (``eval.json``), the samples figure and the training curves of ``run_dir``.

    Returns:
        The files written, by name (a figure is missing where there was nothing to draw).
    """
    if progress:
        print("end-of-run figures …", flush=True)
    written = {"eval.json": run_dir / "eval.json"}
    atomic_write_text(written["eval.json"], strict_json(evaluation, indent=1))
    samples = (vector_figure if len(run.backend.sample_shape) == 1 else image_figure)(run, run_dir / "samples.png")
    written["samples.png"] = samples
    from ..viz import plot_training_curves

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curves = plot_training_curves(records, run_dir / "curves.png", CURVE_KEYS, references=reference_levels(run))
    if curves:
        written["curves.png"] = curves
    return written


def figure_title(run: Run) -> str:
    """The method's name, with its β where it has one (the reward maximisers have none)."""
    beta = getattr(run.config.method, "beta", None)
    return run.config.method.name if beta is None else f"{run.config.method.name}, β={beta:g}"


def reference_levels(run: Run) -> dict[str, tuple[float, str]]:
    """Levels known without training, drawn as lines on the curves: by curve key, (value, label)."""
    from ..rewards.classifier import ClassifierReward

    levels: dict[str, tuple[float, str]] = {}
    if isinstance(run.reward, ClassifierReward) and run.features is not None:
        from ..backends.digits import load_digits_dataset
        from ..eval.metrics import diversity

        data, labels = load_digits_dataset()
        real = data[labels == run.reward.digit]
        features = run.features(real.to(run.backend.device))
        levels["eval/diversity"] = (diversity(features, torch.zeros(len(real), dtype=torch.long),
                                              run.features.distance), "real digits of the class")
    return levels


def vector_figure(run: Run, path: Path) -> Path:
    """Pretrained vs finetuned samples (and the exact target where known), with their mode TV."""
    from ..viz import plot_vector_samples

    target = run.exact_target()
    panels = {
        "pretrained": run.sample(VECTOR_SAMPLES, seed=0, finetuned=False),
        "finetuned": run.sample(VECTOR_SAMPLES, seed=0, finetuned=True),
    }
    if target is not None:
        from ..eval.gmm import mode_weight_tv

        exact = target.sample(VECTOR_SAMPLES, torch.Generator().manual_seed(0))
        reference = target.sample(200_000, torch.Generator().manual_seed(1))
        panels = {
            f"{name} (mode TV {mode_weight_tv(points, reference, run.backend.mixture):.3f})": points
            for name, points in panels.items()
        }
        panels["exact target"] = exact
    title = f"{figure_title(run)}, {VECTOR_SAMPLES} samples from seed 0"
    return plot_vector_samples(panels, path, title)


def image_figure(run: Run, path: Path) -> Path:
    """Pretrained vs finetuned images from the same seeds, with their mean log-reward (and real digits of the class,
    when there is one)."""
    from ..rewards.classifier import ClassifierReward
    from ..viz import plot_image_grids

    panels = {}
    for name, finetuned in (("pretrained", False), ("finetuned", True)):
        states, cond = run.sample_with_conditions(IMAGE_SAMPLES, seed=0, finetuned=finetuned)
        images = run.decode(states)
        log_reward = run.reward.log_reward(images, cond).mean().item()
        panels[f"{name} (mean log R {log_reward:.2f} over these {IMAGE_SAMPLES})"] = images
    if isinstance(run.reward, ClassifierReward):
        from ..backends.digits import load_digits_dataset

        data, labels = load_digits_dataset()
        panels[f"real digits of class {run.reward.digit}"] = data[labels == run.reward.digit][:IMAGE_SAMPLES]
    return plot_image_grids(panels, path, f"{figure_title(run)}, same seeds (seed 0)")
