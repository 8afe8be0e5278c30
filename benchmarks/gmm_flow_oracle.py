"""What the exact flow score allows, without learning: samplers built from it on the mixture suite's cases.

For each case of ``benchmarks/gmm_suite.py`` (and ``--steps``), samples 4,000 chains of four samplers and scores them
against the exact tilted target p·R^β (mode TV and energy distance, with their two-sample floors; the energy's
averaged over 10 pairs):

* ``pretrained``: the pretrained sampler (also scored against its own prior p: the sampler's discretisation alone);
* ``mean_matched_kernel``: each step the pretrained kernel shifted by σ_k² E[∇ log F̃(x_{k+1})] under the shifted
  kernel itself (a fixed point, 6 iterations of 16 draws): the optimum of eq. 16 (``policy_target=detailed_balance``)
  with the exact flow;
* ``tilted_eps``: the pretrained sampler run on ε#(x_k) − √(1 − ᾱ_k) ∇ log F̃(x_k): the optimum of
  ``policy_target=tilted_score`` with the exact flow.

    python benchmarks/gmm_flow_oracle.py --cases 0 5 [--steps 50 100] [--samplers pretrained tilted_eps]
"""

from __future__ import annotations

import argparse

import torch
from gmm_suite import EVAL_SAMPLES, build_run, draw_case, mean_energy_floor

from nablagfn.eval.gmm import target_metrics

SAMPLERS = ("pretrained", "mean_matched_kernel", "tilted_eps")


@torch.no_grad()
def sample(run, kind: str, num: int, seed: int) -> torch.Tensor:
    """``num`` final states of the sampler ``kind`` (see the module docstring)."""
    kernel, backend, exact = run.kernel, run.backend, run.method.exact_flow_score
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num, backend.mixture.dim, generator=generator)
    for k in range(kernel.num_steps):
        step = torch.full((num,), k)
        timestep = kernel.timestep_of_state(step)
        eps = backend.eps(x, timestep, None, finetuned=False)
        if kind == "tilted_eps":
            abar = backend.schedule.alphas_cumprod[timestep].float()[:, None]
            eps = eps - (1 - abar).sqrt() * exact(x, timestep)
        mean, variance = kernel.mean(x, eps, step), kernel.variance_like(x, step)
        if kind == "mean_matched_kernel":
            last = k == kernel.num_steps - 1
            shift = torch.zeros_like(x)
            for _ in range(6):
                draws = (mean + variance * shift)[None] + variance.sqrt()[None] * torch.randn((16, *x.shape),
                                                                                           generator=generator)
                flat = draws.reshape(-1, x.shape[1])
                if last:  # ∇ log F̃(x_K) = β ∇ log R(x_K)
                    final = torch.full((len(flat),), kernel.num_steps)
                    scores = run.method.forward_looking_score(flat, final, torch.zeros_like(final), generator)
                else:
                    scores = exact(flat, kernel.timestep_of_state(step + 1).repeat(16))
                shift = scores.reshape(draws.shape).mean(0)
            mean = mean + variance * shift
        x = mean + variance.sqrt() * torch.randn(x.shape, generator=generator)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    args = parser.parse_args()
    print("| case | steps | sampler | TV (floor) | energy (mean floor) | energy / mean floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for index in args.cases:
        case = draw_case(index)
        for steps in args.steps:
            run = build_run(case["config"], [f"sampler.steps={steps}"])
            prior, target = run.backend.mixture, run.exact_target()
            floors = {"target": mean_energy_floor(target), "its prior p": mean_energy_floor(prior)}
            for kind in args.samplers:
                samples = sample(run, kind, EVAL_SAMPLES, seed=1)
                references = [("target", target)] + ([("its prior p", prior)] if kind == "pretrained" else [])
                for label, reference in references:
                    m = target_metrics(samples, reference, prior, torch.Generator().manual_seed(5))
                    print(f"| {index} | {steps} | {kind} vs {label} | {m['mode_tv']:.3f} ({m['mode_tv_floor']:.3f}) | "
                          f"{m['energy_distance']:.4f} ({floors[label]:.4f}) | "
                          f"{m['energy_distance'] / floors[label]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
