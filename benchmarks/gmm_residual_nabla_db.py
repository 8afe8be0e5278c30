"""Residual ∇-DB on the exact Gaussian mixture: the default settings vs the paper-faithful ones.

Runs each setting on several seeds and prints a Markdown table of mode-weight TV and energy distance to
the exact tilted target (at the end and at the best evaluation), mean log-reward and wall time. Both
settings run side by side in one invocation, so their times are comparable.

    python benchmarks/gmm_residual_nabla_db.py --seeds 0 1 2 [--updates 1500] [--out table.md]
    python benchmarks/gmm_residual_nabla_db.py --settings default --overrides sampler.steps=100
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from nablagfn.config_loading import load_config
from nablagfn.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": None,
    "paper-faithful": ROOT / "configs" / "paper_faithful_gmm.yaml",
}


def run_one(config_path: Path | None, seed: int, updates: int, overrides: list[str], workdir: Path) -> dict:
    config = load_config(config_path, ["model.kind=gmm", f"train.seed={seed}", f"train.updates={updates}", "train.eval_every=250",
                                       "train.eval_samples=8000", "train.checkpoint_every=100000", *overrides])
    trainer = Trainer.from_config(config, workdir, progress=False)
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    evaluations = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in evaluations if "eval/mode_tv" in r]
    final = evaluations[-1]
    target_samples = trainer.run.exact_target().sample(8000, torch.Generator().manual_seed(0))
    target_log_reward = trainer.run.reward.log_reward(target_samples, torch.zeros(8000, dtype=torch.long))
    first_below = next((r["update"] for r in evaluations if r["eval/mode_tv"] <= 0.1), None)
    return {
        "tv_start": evaluations[0]["eval/mode_tv"], "tv": final["eval/mode_tv"],
        "tv_best": min(r["eval/mode_tv"] for r in evaluations), "energy": final["eval/energy_distance"],
        "energy_floor": final["eval/energy_distance_floor"], "log_reward": final["eval/log_reward_mean"],
        "target_log_reward": target_log_reward.mean().item(),
        "updates_to_tv_0.1": first_below, "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value overrides applied to every setting")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    rows = []
    for name in args.settings:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                result = run_one(SETTINGS[name], seed, args.updates, args.overrides, Path(tmp))
            rows.append((name, seed, result))
            print(name, seed, {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, flush=True)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; {args.updates} updates of 256 trajectories; overrides: {args.overrides or 'none'}; "
        "metrics on 8,000 samples.",
        "",
        "| setting | seed | TV start | TV final | TV best | energy dist. final (floor) | mean log R (target) | "
        "updates to TV ≤ 0.1 | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, seed, r in rows:
        lines.append(
            f"| {name} | {seed} | {r['tv_start']:.3f} | {r['tv']:.3f} | {r['tv_best']:.3f} | "
            f"{r['energy']:.4f} ({r['energy_floor']:.4f}) | {r['log_reward']:.2f} ({r['target_log_reward']:.2f}) | "
            f"{r['updates_to_tv_0.1'] if r['updates_to_tv_0.1'] is not None else 'never'} | {r['seconds']:.0f} s |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
