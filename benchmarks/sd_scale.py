"""Stable Diffusion 1.5 at its real size (random weights): seconds, the anatomy of an update and peak memory of
residual ∇-DB against DAG-DB, DDPO and DRaFT-1, through ``method_costs.py``'s measurements.

    python benchmarks/sd_scale.py --device cpu [--latent-size 64] [--out benchmarks/results/sd_scale/cpu.json]
    python benchmarks/sd_scale.py --device cuda --out benchmarks/results/sd_scale/cuda.json

``--device cpu`` uses reduced settings so that it runs on a laptop CPU in minutes: SD 1.5's architecture at
``--latent-size`` (64: 512×512 images), fp32, 4 sampler steps, 2 trajectories per epoch and 1 per update.
``--device cuda`` uses the paper's sampler (50 steps), bf16 base weights and gradient checkpointing, 8 trajectories per
epoch and 2 per update. The architecture is written by ``sd15_architecture.py``; the reward is the weight-free
brightness (the reward towers' own cost is not in these figures).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["residual_nabla_db", "dag_db", "ddpo", "draft"]
CUDA_OVERRIDES = ["sampler.steps=50", "train.trajectories_per_epoch=8", "train.batch_size=2", "model.dtype=bf16",
                  "model.gradient_checkpointing=true", "model.sample_batch_size=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["cost", "memory", "overhead"])
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        help="the cost part holds every method's model at once (about 4.3 GB each in fp32)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    command = [sys.executable, str(HERE / "method_costs.py"), "--model", "sd15", "--device", args.device,
               "--latent-size", str(args.latent_size), "--threads", str(args.threads), "--methods", *args.methods,
               "--parts", *args.parts, "--repeats", "1", "--overhead-repeats", "1",
               "--override", *(CUDA_OVERRIDES if cuda else ["model.dtype=fp32"])]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command += ["--out", str(args.out)]
    sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
