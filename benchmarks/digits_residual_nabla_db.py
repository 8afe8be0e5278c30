"""Digits toward one class with residual ∇-DB, against the ground truth.

With the classifier reward, β = 1 and η = 1 the target is p_pretrained(x) p(k | x). Two references:
the real digits of class k (what a perfect model and classifier would give), and the exact target of
*this* pretrained model, drawn by self-normalised importance resampling of many pretrained samples
with weights p(k | x)^β. Prints class accuracy, Fréchet distance to the real class (classifier
features), and diversity (mean pairwise pixel distance) for each, plus training wall time.

    python benchmarks/digits_residual_nabla_db.py --digit 3 --seeds 0 --pool 6000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nablagfn.config import load_config
from nablagfn.eval.digits import digits_metrics
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer


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
        trainer = Trainer(config, Path(args.out) / f"seed{seed}", progress=False)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        run = trainer.run
        classifier = run.reward.classifier
        for name, finetuned in (("pretrained", False), ("finetuned", True)):
            images = run.decode(run.sample(args.num, seed=1000 + seed, finetuned=finetuned))
            rows[f"{name} (seed {seed})"] = digits_metrics(images, args.digit, classifier)
        rows[f"finetuned (seed {seed})"]["train_seconds"] = seconds
    if args.pool > 0:
        run = Run.build(load_config(None, ["model.kind=digits", f"reward.digit={args.digit}", *args.overrides]))
        target = importance_resampled_target(run, args.pool, args.num, seed=99)
        rows["exact target (importance resampling)"] = digits_metrics(target, args.digit, run.reward.classifier)
    print(f"{'':40s} {'class acc':>9s} {'FD→class':>9s} {'diversity':>9s} {'train s':>8s}")
    for name, metrics in rows.items():
        seconds = f"{metrics['train_seconds']:.0f}" if "train_seconds" in metrics else ""
        print(f"{name:40s} {metrics['class_accuracy']:9.3f} {metrics['fd_to_class']:9.2f} "
              f"{metrics['diversity']:9.3f} {seconds:>8s}")
    print(f"real digits of class {args.digit}: diversity {next(iter(rows.values()))['diversity_real_class']:.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
