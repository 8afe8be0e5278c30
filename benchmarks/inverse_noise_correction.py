"""Inverse noise correction on the built-in digits flow model: FD to the real digits, corrected vs uncorrected, at
several sampling step counts, with the model evaluations per image.

The pretrained digits rectified flow (``model.kind=digits model.parameterization=flow``) is sampled by its Euler ODE
with K steps from N(0, I) (uncorrected), or from the corrector's noise (corrected: ``nablagfn.noise_correction``, a
small MLP flow trained on the 1,797 real digits inverted through a 100-step ODE). Metric: the Fréchet distance to all
real digits in the shipped classifier's 64-d feature space (``eval.metrics.frechet_distance``), on ``--samples``
images. References: the pretrained ODE from the inverted noises themselves (it regenerates the training digits at
K = 100) and from a Gaussian fitted to them; two halves of the real digits (898 images each; a smaller, more biased
pair). Cost: pretrained UNet calls + corrector calls × (corrector FLOPs / UNet FLOPs), counted by torch's FLOP
counter on one sample. ``--pretrain-steps N`` corrects a weaker model, pretrained here for N steps, instead of the shipped one (4,000 steps).
The inversion is cached in ``--out``; figures and commands: docs/methods.md § Inverse noise correction.

    python benchmarks/inverse_noise_correction.py --out benchmarks/results/noise_correction --train-steps 3000
    python benchmarks/inverse_noise_correction.py --out benchmarks/results/noise_correction_weak --train-steps 3000 \
        --pretrain-steps 400
    python benchmarks/inverse_noise_correction.py --figure-only benchmarks/results/noise_correction
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from nablagfn.backends import build_backend
from nablagfn.backends.digits import DigitsModelConfig, load_digits_dataset
from nablagfn.eval.metrics import frechet_distance
from nablagfn.noise_correction import CorrectorTraining, corrected_noise, generate, invert, ode_grid, train_corrector
from nablagfn.pretrain import pretrain_digits_flow
from nablagfn.rewards.classifier import load_digit_classifier


def flops_of(function, *inputs) -> int:
    """FLOPs of one call of ``function(*inputs)`` (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        function(*inputs)
    return counter.get_total_flops()


def write_figure(out: Path) -> None:
    """``figure.png``: FD to the real digits against UNet-equivalent calls per image, corrected and uncorrected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads((out / "result.json").read_text())
    rows = result["rows"]
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.plot([r["unet_calls_uncorrected"] for r in rows], [r["fd_uncorrected"] for r in rows], "o-",
              label="pretrained flow, N(0, I) noise")
    axes.plot([r["unet_calls_corrected"] for r in rows], [r["fd_corrected"] for r in rows], "s-",
              label=f"corrected noise ({result['corrector_steps']} corrector steps)")
    for r in rows:
        axes.annotate(f"K={r['steps']}", (r["unet_calls_uncorrected"], r["fd_uncorrected"]), fontsize=7)
    axes.axhline(result["fd_floor_real_halves"], color="grey", ls=":",
                 label="real half vs real half (898 images each)")
    axes.set_xscale("log")
    axes.set_xlabel("UNet-equivalent evaluations per image")
    axes.set_ylabel("FD to the real digits")
    steps, ema = result.get("pretrain_steps", 4000), result.get("pretrain_ema", 0.999)
    model = "the shipped digits flow" if (steps, ema) == (4000, 0.999) else f"a digits flow of {steps} steps (EMA {ema})"
    axes.set_title(f"Inverse noise correction, {model}", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "figure.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure-only", type=Path, metavar="DIR", help="only redraw DIR/figure.png from its result")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 10, 50], help="pretrained ODE steps K")
    parser.add_argument("--corrector-steps", type=int, default=5, help="corrector ODE steps K_c")
    parser.add_argument("--inversion-steps", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--pretrain-steps", type=int, help="correct a digits flow pretrained for this many steps "
                        "(written to --out) instead of the shipped one")
    parser.add_argument("--pretrain-ema", type=float, default=0.999, help="its EMA decay (the shipped model's: 0.999)")
    parser.add_argument("--coupling", choices=["minibatch_ot", "independent"], default="minibatch_ot")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.figure_only:
        write_figure(args.figure_only)
        return
    if args.out is None:
        parser.error("--out is required")
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    weights = None
    if args.pretrain_steps:  # a weaker model than the shipped one (4,000 steps): more learning error to correct
        weights = args.out / f"digits_flow_{args.pretrain_steps}_steps_ema{args.pretrain_ema}.safetensors"
        if not weights.exists():
            pretrain_digits_flow(weights, steps=args.pretrain_steps, ema=args.pretrain_ema)
    backend = build_backend(DigitsModelConfig(parameterization="flow", weights=weights and str(weights))).eval()
    classifier = load_digit_classifier(None).eval()
    images, _ = load_digits_dataset()
    data = images * 2 - 1
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return backend.eps(x, t, torch.zeros(len(x), dtype=torch.long), finetuned=False)

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return classifier.features(backend.decode(x))

    real_features = classifier.features(images)
    half = len(images) // 2
    floor = frechet_distance(real_features[:half], real_features[half:])

    cache = args.out / f"inverted_{args.inversion_steps}_steps.pt"
    if cache.exists():  # the inversion is the slow part: reuse it across corrector settings
        inverted, reconstruction, inversion_seconds = torch.load(cache).values()
    else:
        started = time.perf_counter()
        inverted = invert(velocity, data, ode_grid(args.inversion_steps), iterations=4)
        reconstruction = (generate(velocity, inverted, ode_grid(args.inversion_steps)) - data).abs().max().item()
        inversion_seconds = time.perf_counter() - started
        torch.save({"inverted": inverted, "reconstruction": reconstruction, "seconds": inversion_seconds}, cache)
    started = time.perf_counter()
    corrector = train_corrector(inverted, CorrectorTraining(steps=args.train_steps, batch_size=256, lr=1e-3,
                                                            seed=args.seed, coupling=args.coupling),
                                hidden=args.hidden, progress=True)
    training_seconds = time.perf_counter() - started

    one = torch.zeros(1, *data.shape[1:])
    unet_flops = flops_of(velocity, one, torch.full((1,), 500.0))
    corrector_flops = flops_of(corrector, one, torch.full((1,), 500.0))
    cost_ratio = corrector_flops / unet_flops

    rows = []
    flat = inverted.flatten(1)  # references: the inverted noises themselves, and a Gaussian fitted to them
    covariance = torch.cov(flat.T) + 1e-5 * torch.eye(flat.shape[1])
    fitted = torch.distributions.MultivariateNormal(flat.mean(0), covariance)
    for steps in args.steps:
        generator = torch.Generator().manual_seed(args.seed + 1)
        gaussian_fit = fitted.sample((args.samples,)).reshape(args.samples, *data.shape[1:])
        plain = generate(velocity, torch.randn((args.samples, *data.shape[1:]), generator=generator), ode_grid(steps))
        noise = corrected_noise(corrector, args.samples, args.corrector_steps, generator)
        corrected = generate(velocity, noise, ode_grid(steps))
        rows.append({
            "steps": steps,
            "fd_uncorrected": frechet_distance(features(plain), real_features),
            "fd_corrected": frechet_distance(features(corrected), real_features),
            "fd_inverted_noise": frechet_distance(features(generate(velocity, inverted, ode_grid(steps))), real_features),
            "fd_gaussian_fit": frechet_distance(features(generate(velocity, gaussian_fit, ode_grid(steps))),
                                                real_features),
            "unet_calls_uncorrected": steps,
            "unet_calls_corrected": steps + args.corrector_steps * cost_ratio,
        })
        print(rows[-1], flush=True)
    result = {
        "rows": rows, "fd_floor_real_halves": floor, "corrector_steps": args.corrector_steps,
        "corrector_flops_per_unet_flop": cost_ratio, "inversion_steps": args.inversion_steps,
        "inversion_max_reconstruction_error": reconstruction, "inversion_seconds": inversion_seconds,
        "inverted_noise_std": inverted.std().item(), "inverted_noise_mean_abs": inverted.mean(0).abs().mean().item(),
        "pretrain_steps": args.pretrain_steps or 4000,
        "pretrain_ema": args.pretrain_ema if args.pretrain_steps else 0.999, "coupling": args.coupling,
        "corrector_training_steps": args.train_steps, "corrector_training_seconds": training_seconds,
        "samples": args.samples, "seed": args.seed,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    lines = ["| K (pretrained steps) | FD uncorrected | FD corrected | UNet-equivalent calls, corrected | FD from the "
             "inverted noises | FD from a Gaussian fitted to them |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['steps']} | {r['fd_uncorrected']:.2f} | {r['fd_corrected']:.2f} | "
              f"{r['unet_calls_corrected']:.2f} | {r['fd_inverted_noise']:.2f} | {r['fd_gaussian_fit']:.2f} |"
              for r in rows]
    lines.append(f"\nFD between two halves of the real digits (898 images each): {floor:.2f}; corrector "
                 f"{args.corrector_steps} steps at "
                 f"{cost_ratio:.3f} UNet FLOPs each; inversion error {reconstruction:.1e}.")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    write_figure(args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
