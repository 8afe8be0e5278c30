"""Adjoint Matching: the lean adjoint, the loss at the analytic optimum, the discrete optimality condition,
memoryless-sampler and reward requirements, and short training runs (GMM, tiny Stable Diffusion, digits)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.mdp import DDIMKernel, Trajectories
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer

AM = "method.name=adjoint_matching"
FAST = ["model.kind=gmm", "sampler.steps=10", "model.hidden=32", "model.layers=2", AM]
#: a 1-D Gaussian prior N(0.5, 0.8²): ε# is linear in x, so every pretrained step mean is A_k x + c_k
GAUSSIAN_1D = ["model.kind=gmm", "model.means=[[0.5]]", "model.stds=[0.8]", "model.hidden=16", "model.layers=1", AM]


def build_run(*overrides: str) -> Run:
    return Run.build(load_config(None, list(overrides)))


def linear_slopes(run: Run) -> Tensor:
    """A_k = dμ#/dx of each step for a single-Gaussian prior N(m, s²): ε#(x, t) = √(1−ᾱ)(x − √ᾱ m)/(ᾱ s² + 1 − ᾱ)."""
    kernel, mixture = run.kernel, run.backend.mixture
    abar = run.backend.schedule.alphas_cumprod.to(torch.float64)[kernel.state_timesteps[:-1]]
    spread = abar * mixture.stds[0] ** 2 + 1 - abar
    return kernel.x_coef + kernel.eps_coef * (1 - abar).sqrt() / spread


def suffix_products(slopes: Tensor) -> Tensor:
    """P_k = A_k A_{k+1} … A_{K−1} for k = 0 … K (P_K = 1)."""
    products = torch.ones(len(slopes) + 1, dtype=torch.float64)
    for k in range(len(slopes) - 1, -1, -1):
        products[k] = slopes[k] * products[k + 1]
    return products


def sample_trajectories(run: Run, num: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return run.rollout(run.backend.sample_conditions(num, generator), generator)


# -- the lean adjoint ---------------------------------------------------------------------------------------------
def test_lean_adjoint_is_the_product_of_pretrained_jacobians():
    """Linear pretrained means, Gaussian reward: ã_k = A_k ⋯ A_{K−1} · β (x_K − c)/scale², by hand."""
    run = build_run("model.kind=gmm", "model.means=[[0.5, -0.2]]", "model.stds=[0.8]", AM, "sampler.steps=12",
                    "reward.kind=gaussian", "reward.center=[1.0, 2.0]", "reward.scale=1.5", "method.beta=0.7")
    trajectories = sample_trajectories(run, 6)
    first_state = 3
    adjoint = run.method.lean_adjoint(trajectories, first_state, torch.Generator().manual_seed(0))

    final = trajectories.final.double()
    terminal = 0.7 * (final - torch.tensor([1.0, 2.0], dtype=torch.float64)) / 1.5**2  # −β ∇ log R(x_K)
    products = suffix_products(linear_slopes(run))
    for k in range(first_state, run.kernel.num_steps + 1):
        torch.testing.assert_close(adjoint[:, k].double(), products[k] * terminal, rtol=1e-4, atol=1e-6)
    assert (adjoint[:, :first_state] == 0).all()
    assert products[first_state] < 0.5  # the Jacobians really shrink the adjoint: the test can tell a missing one


def test_lean_adjoint_ignores_the_finetuned_model():
    run = build_run(*FAST, "reward.kind=gaussian")
    trajectories = sample_trajectories(run, 8)
    before = run.method.lean_adjoint(trajectories, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in run.backend.trainable_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    after = run.method.lean_adjoint(trajectories, 1, torch.Generator().manual_seed(0))
    assert torch.equal(before, after)
    assert not before.requires_grad


# -- the loss at the analytic optimum -------------------------------------------------------------------------------
class StepTable(nn.Module):
    """An ε offset per diffusion timestep, independent of x (the optimal control of a linear-Gaussian problem)."""

    def __init__(self, offsets: Tensor):
        super().__init__()
        self.offsets = nn.Parameter(offsets.float())

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        return self.offsets[timestep].to(x)[:, None].expand_as(x)


def optimal_control(run: Run, beta: float, direction: float) -> Tensor:
    """Δ_k = −σ_k² ã_{k+1} with ã_{k+1} = −β w A_{k+1} ⋯ A_{K−1} (deterministic: ã does not depend on the path)."""
    products = suffix_products(linear_slopes(run))
    return beta * direction * run.kernel.std**2 * products[1:]


def install_control(run: Run, control: Tensor) -> None:
    """Make the finetuned step mean μ# + Δ_k: ε offset Δ_k / b_k at each step's timestep."""
    kernel = run.kernel
    offsets = torch.zeros(run.backend.schedule.num_train_timesteps, dtype=torch.float64)
    offsets[kernel.state_timesteps[:-1]] = control / kernel.eps_coef
    run.backend.residual = StepTable(offsets)


def test_loss_is_zero_at_the_analytic_optimum_of_a_linear_gaussian_problem():
    beta, direction = 0.8, 1.5
    run = build_run(*GAUSSIAN_1D, "sampler.steps=20", "reward.kind=linear", f"reward.direction=[{direction}]",
                    f"method.beta={beta}", "method.subsample.kind=all")
    control = optimal_control(run, beta, direction)
    install_control(run, control)
    trajectories = sample_trajectories(run, 32)
    loss, metrics = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    assert metrics["control/mean_square"] > 1e-3  # the optimum is not the zero control

    # half the optimal control: a positive loss whose gradient raises the control toward the optimum
    install_control(run, 0.5 * control)
    loss, _ = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(0))
    assert loss.item() > 1e-3
    loss.backward()
    (offsets,) = run.backend.trainable_parameters()
    used = run.kernel.state_timesteps[:-1]
    # descending the gradient moves each step's mean shift b_k·offset up, toward the optimum
    assert (-offsets.grad[used].double() * run.kernel.eps_coef >= 0).all()
    assert (-offsets.grad[used].double() * run.kernel.eps_coef).sum() > 0


def test_optimal_control_samples_the_tilted_pretrained_sampler():
    """At the optimum the final samples follow the pretrained sampler's own output N(M, V), tilted by R^β:
    N(M + β w V, V). (The 50-step DDPM sampler of N(0.5, 0.8²) has V ≈ 0.54, not 0.64: the target is the
    tilt of what the pretrained sampler produces.) DDPM's memory of the initial noise, (A_0 ⋯ A_{K−1})², is
    negligible; with DDIM η = 0.3 it is not, which is why such samplers are refused."""
    beta, direction = 0.8, 1.5
    run = build_run(*GAUSSIAN_1D, "sampler.steps=50", "reward.kind=linear", f"reward.direction=[{direction}]",
                    f"method.beta={beta}")
    install_control(run, optimal_control(run, beta, direction))
    pretrained = run.sample(40000, seed=3, finetuned=False).double()
    finetuned = run.sample(40000, seed=4).double()
    tilted_mean = pretrained.mean() + beta * direction * pretrained.var()
    assert abs(finetuned.mean() - tilted_mean) < 0.02  # MC error ≈ 0.006; the tilt moves the mean by 0.65
    assert abs(finetuned.std() - pretrained.std()) < 0.01
    assert suffix_products(linear_slopes(run))[0] ** 2 < 1e-3

    run.kernel = DDIMKernel(run.backend.schedule, 50, eta=0.3)
    assert suffix_products(linear_slopes(run))[0] ** 2 > 0.05


def test_regression_target_is_the_mean_of_the_tilted_kernel_on_the_ring():
    """The discrete optimality condition on the 8-mode ring (non-linear ε#): under the tilted path measure
    P* ∝ P#·R^β(x_K) (pretrained paths weighted by R^β), the step's mean shift E*[x_{k+1} − μ#(x_k)] equals
    the regression target −σ_k² E*[ã_{k+1}], path by path in expectation."""
    run = build_run("model.kind=gmm", AM, "sampler.steps=50")
    kernel, backend, method = run.kernel, run.backend, run.method
    num, k = 20000, 38
    generator = torch.Generator().manual_seed(0)
    abar = backend.schedule.alphas_cumprod[kernel.state_timesteps[k]]
    start = (torch.tensor([[1.0, 0.5]]) * abar.sqrt()).double().repeat(num, 1)
    states = [start]
    for j in range(k, kernel.num_steps):  # pretrained paths from x_k
        step = torch.full((num,), j)
        next_state, _ = kernel.step(states[-1], backend.pretrained_eps(states[-1], kernel.timestep_of_state(step)),
                                    step, generator)
        states.append(next_state)
    trajectories = Trajectories(  # only the states from x_k on are read
        states=torch.cat([torch.zeros(num, k, 2, dtype=torch.float64), torch.stack(states, 1)], 1),
        timesteps=kernel.state_timesteps.expand(num, -1), eps=torch.zeros(num, kernel.num_steps, 2),
        log_probs=torch.zeros(num, kernel.num_steps), cond=torch.zeros(num, dtype=torch.long),
    )
    adjoint = method.lean_adjoint(trajectories, k + 1, generator)[:, k + 1]

    weights = torch.softmax(method.config.beta * run.reward.log_reward(states[-1], None).double(), 0)
    step = torch.full((1,), k)
    mean = kernel.mean(start[:1], backend.pretrained_eps(start[:1], kernel.timestep_of_state(step)), step)
    shift = states[1] - mean  # x_{k+1} − μ#(x_k)
    target = -kernel.std[k] ** 2 * adjoint.double()
    tilted_shift = (weights[:, None] * shift).sum(0)
    difference = shift - target
    mean_difference = (weights[:, None] * difference).sum(0)
    standard_error = ((weights[:, None] ** 2) * (difference - mean_difference) ** 2).sum(0).sqrt()
    assert (mean_difference.abs() < 4 * standard_error + 1e-6).all(), (mean_difference, standard_error)
    assert (tilted_shift.abs() > 8 * standard_error).all()  # the tilt is resolved: a wrong target would show


# -- requirements -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [["sampler.kind=ddim", "sampler.eta=0.5"], ["sampler.kind=ddpm", "sampler.eta=2.0"]])
def test_refuses_samplers_that_are_not_memoryless(sampler):
    with pytest.raises(ConfigError, match=r"memoryless.*sampler\.kind=ddim with sampler\.eta="):
        build_run(*FAST, *sampler)


def test_accepts_ddpm_and_the_first_order_sde_dpm_solver():
    """SDE-DPM-Solver++ at first order is the DDPM posterior step on its own timesteps, hence memoryless."""
    for sampler in (["sampler.kind=ddpm"], ["sampler.kind=ddim", "sampler.eta=1"], ["sampler.kind=dpm_solver"]):
        run = build_run(*FAST, *sampler)
        loss, _ = run.method.trajectory_loss(sample_trajectories(run, 4), torch.Generator().manual_seed(0))
        assert torch.isfinite(loss)


def test_refuses_non_differentiable_rewards():
    with pytest.raises(ConfigError, match="differentiable"):
        build_run("model.kind=digits", "reward.kind=jpeg_compressibility", AM)


def test_target_is_the_tilted_prior():
    """prior_strength is fixed at 1, so the exact target of a GMM run is p·R^β."""
    run = build_run(*FAST, "method.beta=0.5")
    target = run.exact_target()
    expected = run.reward.tilt(run.backend.mixture, 0.5)
    assert torch.allclose(target.means, expected.means) and torch.allclose(target.weights, expected.weights)
    with pytest.raises(ConfigError, match="prior_strength"):
        build_run(*FAST, "method.prior_strength=0.5")


# -- training ---------------------------------------------------------------------------------------------------------
def test_short_gmm_run_raises_the_reward(tmp_path):
    config = load_config(None, [*FAST, "train.trajectories_per_epoch=64", "train.batch_size=32", "train.updates=30",
                                "train.eval_samples=500", "train.eval_every=1000", "train.on_policy=true"])
    trainer = Trainer.from_config(config, tmp_path, progress=False)
    before = trainer.run.evaluate(500)
    after = trainer.train()
    assert after["log_reward_mean"] > before["log_reward_mean"] + 1.0
    assert after["mode_tv"] < before["mode_tv"] - 0.1


def test_tiny_stable_diffusion_training_step(tmp_path):
    pytest.importorskip("peft")
    from tiny_sd import save_tiny_sd

    pipeline = save_tiny_sd(tmp_path / "pipeline")
    config = load_config(None, [
        "model.kind=stable_diffusion", f"model.path={pipeline}", "model.dtype=fp32", "model.flow_channels=[8,16]",
        "reward.kind=brightness", "sampler.steps=3", AM, "method.beta=100", "train.trajectories_per_epoch=2",
        "train.batch_size=2", "train.updates=1", "train.eval_samples=2",
    ])
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)
    lora_before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    metrics = trainer.train()
    assert torch.isfinite(torch.tensor(metrics["log_reward_mean"]))
    lora_after = trainer.run.backend.adapter_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)


def test_digits_training_step_through_the_cli(tmp_path):
    from nablagfn.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", "model.kind=digits", AM,
                 "sampler.steps=5", "train.updates=1", "train.trajectories_per_epoch=4", "train.batch_size=2",
                 "train.eval_samples=4"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"loss"') == 1
