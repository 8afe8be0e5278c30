"""Digits toward one class with residual ∇-DB, against the ground truth.

With the classifier reward, β = 1 and η = 1 the target is p_pretrained(x) p(k | x). Two references:
the real digits of class k (what a perfect model and classifier would give), and the exact target of
*this* pretrained model, drawn by self-normalised importance resampling of many pretrained samples
with weights p(k | x)^β. Prints class accuracy, Fréchet distance to the real class (classifier
features), and diversity (mean pairwise distance in the same features; the real class's is printed last) for
each, plus training wall time. A run directory that already holds a finished run is evaluated, not retrained.

    python benchmarks/digits_residual_nabla_db.py --digit 3 --seeds 0 --pool 6000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nablagfn.config_loading import load_config
from nablagfn.eval.digits import digits_metrics
from nablagfn.eval.metrics import mean_pairwise_distance
from nablagfn.train.checkpoint import list_checkpoints
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer, load_weights


def image_metrics(run: Run, images: torch.Tensor, digit: int) -> dict[str, float]:
    """Class share, FD to the real class and diversity of images, in the run's evaluation features."""
    metrics = digits_metrics(images, digit, run.reward.classifier, run.features)
    metrics["diversity"] = mean_pairwise_distance(run.features(images), run.features.distance)
    metrics["diversity_pixels"] = mean_pairwise_distance(images.flatten(1).float())
    return metrics


def importance_resampled_target(run: Run, pool: int, num: int, seed: int) -> torch.Tensor:
    """Images from p_pretrained(x) R(x)^β by resampling ``pool`` pretrained samples (with replacement)."""
    states, cond = run.sample_with_conditions(pool, seed=seed, finetuned=False)
    images = run.decode(states)
    log_weights = run.config.method.beta * run.reward.log_reward(images, cond)
    generator = torch.Generator().manual_seed(seed)
    index = torch.multinomial(torch.softmax(log_weights, 0), num, replacement=True, generator=generator)
    effective = (log_weights.softmax(0).pow(2).sum().reciprocal()).item()
    print(f"importance resampling: pool {pool}, effective sample size {effective:.0f}")
    return images[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pool", type=int, default=6000, help="pretrained samples for importance resampling (0: skip the exact-target row)")
    parser.add_argument("--num", type=int, default=1000, help="samples per evaluation")
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--out", default="runs/bench_digits")
    args = parser.parse_args()

    rows = {}
    for seed in args.seeds:
        overrides = ["model.kind=digits", f"reward.digit={args.digit}", f"train.seed={seed}", *args.overrides]
        config = load_config(None, overrides)
        run_dir = Path(args.out) / f"seed{seed}"
        trainer = Trainer.from_config(config, run_dir, progress=False)
        checkpoints = list_checkpoints(run_dir) if run_dir.exists() else []
        if checkpoints and checkpoints[-1].name == f"update_{config.train.updates:07d}":
            load_weights(trainer.run, checkpoints[-1])
        else:
            trainer.train()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        seconds = max(r.get("time", 0.0) for r in records)  # the run's wall time (its evaluations included)
        run = trainer.run
        for name, finetuned in (("pretrained", False), ("finetuned", True)):
            images = run.decode(run.sample(args.num, seed=1000 + seed, finetuned=finetuned))
            rows[f"{name} (seed {seed})"] = image_metrics(run, images, args.digit)
        rows[f"finetuned (seed {seed})"]["train_seconds"] = seconds
    if args.pool > 0:
        run = Run.build(load_config(None, ["model.kind=digits", f"reward.digit={args.digit}", *args.overrides]))
        target = importance_resampled_target(run, args.pool, args.num, seed=99)
        rows["exact target (importance resampling)"] = image_metrics(run, target, args.digit)
    print(f"{'':40s} {'class acc':>9s} {'FD→class':>9s} {'diversity':>9s} {'pixels':>7s} {'train s':>8s}")
    for name, metrics in rows.items():
        seconds = f"{metrics['train_seconds']:.0f}" if "train_seconds" in metrics else ""
        print(f"{name:40s} {metrics['class_accuracy']:9.3f} {metrics['fd_to_class']:9.2f} "
              f"{metrics['diversity']:9.3f} {metrics['diversity_pixels']:7.3f} {seconds:>8s}")
    print(f"real digits of class {args.digit}: diversity {next(iter(rows.values()))['diversity_real_class']:.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
