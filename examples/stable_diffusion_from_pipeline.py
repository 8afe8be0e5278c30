"""Finetune a Stable Diffusion pipeline already in memory, with a reward written here, and take the LoRA back.

The pipeline is any diffusers ``StableDiffusionPipeline`` (SD 1.x/2.x shapes): here loaded from ``--pipeline``
(a directory or a hub id). The reward prefers warm images (mean red minus mean blue); swap in your own. After
training, the LoRA is exported for diffusers and loaded into a fresh copy of the pipeline, which generates with
diffusers' own sampler.

    python examples/stable_diffusion_from_pipeline.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda [--updates 100] [--out runs/warm]

On a GPU, the paper's settings (50 steps, 64 trajectories per epoch) are what ``configs/sd_aesthetic.yaml`` holds;
the defaults below are small so that the script also runs on a CPU with a tiny pipeline (as its test does).
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
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline directory or hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--trajectories", type=int, default=8, help="trajectories per epoch (and per update)")
    parser.add_argument("--out", default="runs/warm")
    args = parser.parse_args()

    half = {"torch_dtype": torch.float16} if args.device.startswith("cuda") else {}  # frozen weights; LoRA in fp32
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None, **half)
    torch.manual_seed(0)
    backend = ng.StableDiffusionBackend.from_pipeline(pipe, prompts=PROMPTS, lora_rank=8, sample_batch_size=8)
    trainer = ng.Trainer(
        backend,
        ng.CallableReward(warmth),
        ng.ResidualNablaDBConfig(beta=1.0),
        sampler=ng.SamplerConfig(steps=args.steps),
        train={"updates": args.updates, "trajectories_per_epoch": args.trajectories, "batch_size": args.trajectories,
               "eval_samples": 2 * len(PROMPTS), "eval_every": args.updates, "checkpoint_every": args.updates,
               "device": args.device},
        eval={"prior_fid": False},
        run_dir=args.out,
    )
    metrics = trainer.train()
    print(f"mean log R of the finetuned model: {metrics['log_reward_mean']:.3f}")

    lora = ng.export_lora(args.out, Path(args.out) / "lora")
    fresh = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None, **half)
    fresh.scheduler = DDIMScheduler.from_config(fresh.scheduler.config, clip_sample=False)
    fresh.load_lora_weights(lora)
    fresh.to(args.device)
    images = fresh(PROMPTS[:2], num_inference_steps=args.steps, guidance_scale=backend.guidance_scale, eta=1.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    print(f"diffusers with the exported LoRA: {len(images)} images, mean log R {warmth(images, PROMPTS).mean():.3f}")
    print(f"LoRA for pipe.load_lora_weights: {lora}")


if __name__ == "__main__":
    main()
