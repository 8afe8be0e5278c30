"""Finetune a FLUX.1 pipeline already in memory toward a reward written here, and take the LoRA back.

The pipeline is any diffusers ``FluxPipeline`` (FLUX.1-dev or schnell), loaded from ``--pipeline`` (a directory or a
hub id). The reward prefers warm images (mean red minus mean blue); swap in your own. Residual ∇-DB samples
∝ R^β · p_pretrained: the images get warmer while staying FLUX's. After training, the LoRA is exported for diffusers
and loaded into a fresh copy of the pipeline, which generates with FluxPipeline's own sampler.

    python examples/flux_from_pipeline.py --pipeline black-forest-labs/FLUX.1-dev --device cuda [--updates 100]

The defaults are small so that the script also runs on a CPU with a tiny pipeline (as its test does); on FLUX's
real weights use a large GPU (bf16 weights are loaded there), gradient checkpointing is on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import nablagfn as ng

PROMPTS = ["a cat", "a dog", "a horse", "a bird"]


def warmth(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """log R of each (B, 3, H, W) image in [0, 1]: 10 × (mean red − mean blue) (differentiable)."""
    return 10 * (images[:, 0] - images[:, 2]).mean(dim=(1, 2))


def main() -> None:
    from diffusers import FluxPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="diffusers FLUX pipeline directory or hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--trajectories", type=int, default=4, help="trajectories per epoch (and per update)")
    parser.add_argument("--out", default="runs/flux_warm")
    args = parser.parse_args()

    half = {"torch_dtype": torch.bfloat16} if args.device.startswith("cuda") else {}  # frozen weights; LoRA in fp32
    pipe = FluxPipeline.from_pretrained(args.pipeline, **half)
    torch.manual_seed(0)
    backend = ng.FluxBackend.from_pipeline(pipe, prompts=PROMPTS, resolution=args.resolution, lora_rank=8,
                                           gradient_checkpointing=args.device.startswith("cuda"))
    trainer = ng.Trainer(
        backend,
        ng.CallableReward(warmth),
        ng.ResidualNablaDBConfig(beta=1.0),
        sampler=ng.SamplerConfig(steps=args.steps),  # flow_ddpm, the memoryless flow sampler residual ∇-DB needs
        train={"updates": args.updates, "trajectories_per_epoch": args.trajectories, "batch_size": 1,
               "accumulation": args.trajectories, "eval_samples": len(PROMPTS), "eval_every": args.updates,
               "checkpoint_every": args.updates, "device": args.device},
        eval={"prior_fid": False},
        run_dir=args.out,
    )
    metrics = trainer.train()
    print(f"mean log R of the finetuned model: {metrics['log_reward_mean']:.3f}")

    lora = ng.export_lora(args.out, Path(args.out) / "lora")
    fresh = FluxPipeline.from_pretrained(args.pipeline, **half)
    fresh.load_lora_weights(lora)
    fresh.to(args.device)
    images = fresh(PROMPTS[:2], height=args.resolution, width=args.resolution, num_inference_steps=args.steps,
                   guidance_scale=backend.guidance_scale, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
    print(f"FluxPipeline with the exported LoRA: {len(images)} images, mean log R {warmth(images, PROMPTS).mean():.3f}")
    print(f"LoRA for pipe.load_lora_weights: {lora}")


if __name__ == "__main__":
    main()
