"""The exact flow score of a tilted Gaussian mixture, and its use as residual ∇-DB's ground truth."""

from __future__ import annotations

import math

import pytest
import torch

from nablagfn.config import ConfigError
from nablagfn.config_loading import load_config
from nablagfn.mdp import EpsilonParameterization, FlowParameterization, NoiseSchedule
from nablagfn.methods import make_transitions
from nablagfn.mixture import GaussianMixture
from nablagfn.rewards.vector import ExactFlowScore, GaussianReward, LinearReward
from nablagfn.train.run import Run

MIXTURE = GaussianMixture(
    torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]]), torch.tensor([0.3, 0.45, 0.35]), torch.tensor([0.5, 0.3, 0.2])
)


def grid_log_flow(reward, beta: float, abar: float, points: torch.Tensor) -> torch.Tensor:
    """log F̃_t(x) = log ∫ p(x₀) R(x₀)^β q_t(x | x₀) dx₀ − log ∫ p(x₀) q_t(x | x₀) dx₀, both integrals summed on a
    fine grid of x₀ (no closed form used)."""
    axis = torch.linspace(-5, 5, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    log_prior = MIXTURE.log_prob(grid)
    log_reward = beta * reward.log_reward(grid, torch.zeros(len(grid), dtype=torch.long)).double()
    distances = torch.cdist(points.double(), math.sqrt(abar) * grid) ** 2
    log_kernel = -0.5 * distances / (1 - abar)
    tilted = torch.logsumexp(log_kernel + log_prior + log_reward, 1)
    plain = torch.logsumexp(log_kernel + log_prior, 1)
    return tilted - plain


@pytest.mark.parametrize("reward", [GaussianReward([1.5, 0.5], 1.2), LinearReward([0.8, -0.4])], ids=["gaussian", "linear"])
@pytest.mark.parametrize("abar", [0.9, 0.5, 0.1])
def test_exact_flow_score_matches_finite_differences_of_the_grid_tilted_marginal(reward, abar):
    beta = 1.5
    oracle = ExactFlowScore(MIXTURE, reward, beta, eps_parameterization(abar))
    points = torch.tensor([[0.0, 0.0], [-1.2, 0.4], [1.3, 1.1], [0.2, -2.0]], dtype=torch.float64)
    exact = oracle(points, torch.zeros(len(points), dtype=torch.long))
    delta = 1e-3
    finite = torch.stack([
        (grid_log_flow(reward, beta, abar, points + delta * e) - grid_log_flow(reward, beta, abar, points - delta * e))
        / (2 * delta)
        for e in torch.eye(2, dtype=torch.float64)
    ], 1)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, finite, rtol=1e-4, atol=1e-4)


def eps_parameterization(abar: float) -> EpsilonParameterization:
    """ε-prediction under a one-timestep schedule with ᾱ_0 = ``abar``."""
    return EpsilonParameterization(NoiseSchedule(torch.tensor([abar], dtype=torch.float64)))


@pytest.mark.parametrize("sigma", [0.2, 0.5, 0.9])
def test_exact_flow_score_of_a_flow_model_is_the_rescaled_diffusion_one(sigma):
    """x_σ = (1 − σ) x₀ + σ ε is c·x_t of a VP process with c = √((1 − σ)² + σ²), ᾱ = (1 − σ)²/c², so
    ∇ log F̃ at x under the flow is ∇ log F̃_ᾱ(x/c)/c."""
    reward, beta = GaussianReward([1.5, 0.5], 1.2), 1.5
    scale = math.sqrt((1 - sigma) ** 2 + sigma**2)
    diffusion = ExactFlowScore(MIXTURE, reward, beta, eps_parameterization((1 - sigma) ** 2 / scale**2))
    flow = ExactFlowScore(MIXTURE, reward, beta, FlowParameterization())
    points = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = diffusion(points / scale, torch.zeros(8, dtype=torch.long)) / scale
    torch.testing.assert_close(flow(points, torch.full((8,), sigma * 1000.0)), expected, rtol=1e-10, atol=1e-12)


def test_flow_score_vanishes_without_a_tilt_signal_far_from_data():
    """At pure noise (ᾱ → 0) x_t says nothing about x₀, so F̃ is flat: its score tends to 0."""
    oracle = ExactFlowScore(MIXTURE, LinearReward([0.8, -0.4]), 1.0, eps_parameterization(1e-8))
    score = oracle(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(16, dtype=torch.long))
    assert score.abs().max() < 1e-3


@pytest.mark.parametrize("policy_target", ["tilted_score", "detailed_balance"])
def test_residual_nabla_db_logs_its_errors_against_the_exact_flow_score(policy_target):
    overrides = ["model.kind=gmm", "sampler.steps=10", "train.seed=0", f"method.policy_target={policy_target}"]
    run = Run.build(load_config(None, overrides))
    trajectories = run.rollout(torch.zeros(32, dtype=torch.long), torch.Generator().manual_seed(0))
    _, metrics = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(1))
    bands = {"k00-01", "k02-03", "k04-05", "k06-07", "k08-09"}
    assert {f"flow_error/{b}" for b in bands} <= set(metrics) and {f"policy_error/{b}" for b in bands} <= set(metrics)
    # at initialisation the policy is the pretrained one (zero drift): its relative error is exactly 1
    assert all(metrics[f"policy_error/{b}"] == pytest.approx(1.0) for b in bands)
    # g_φ starts at 0, so the learned flow score is the look-ahead alone, an imperfect but informative estimate
    assert all(0 < metrics[f"flow_error/{b}"] < 1.5 for b in bands)


def test_flow_oracle_replaces_the_learned_flow_in_the_forward_loss():
    overrides = ["model.kind=gmm", "sampler.steps=10", "train.seed=0"]
    learned = Run.build(load_config(None, overrides))
    oracle = Run.build(load_config(None, [*overrides, "method.flow_oracle=true"]))
    trajectories = learned.rollout(torch.zeros(64, dtype=torch.long), torch.Generator().manual_seed(0))
    _, with_learned = learned.method.trajectory_loss(trajectories, torch.Generator().manual_seed(1))
    _, with_oracle = oracle.method.trajectory_loss(trajectories, torch.Generator().manual_seed(1))
    assert with_oracle["loss/reverse"] == pytest.approx(with_learned["loss/reverse"])
    assert with_oracle["loss/forward"] != pytest.approx(with_learned["loss/forward"], rel=1e-3)


@pytest.mark.parametrize("extra", [["method.prior_strength=0.5"], ["reward.kind=brightness", "model.kind=digits"]])
def test_flow_oracle_is_refused_where_the_flow_is_unknown(extra):
    overrides = ["model.kind=gmm", *extra, "method.flow_oracle=true"]
    with pytest.raises(ConfigError, match="method.flow_oracle"):
        Run.build(load_config(None, overrides))


def test_tilted_score_loss_is_the_distance_to_the_tilted_models_eps():
    """policy_target=tilted_score with the exact flow: the forward loss is ‖ε_θ − ε# + √(1 − ᾱ_k) ∇ log F̃(x_k)‖²
    (η = 1), zero exactly when the finetuned ε is the tilted target's."""
    run = Run.build(load_config(None, ["model.kind=gmm", "sampler.steps=10", "method.flow_oracle=true"]))
    method, kernel, backend = run.method, run.kernel, run.backend
    assert run.config.method.policy_target == "tilted_score"
    trajectories = run.rollout(torch.zeros(16, dtype=torch.long), torch.Generator().manual_seed(0))
    steps = torch.arange(10).repeat(2)
    batch = make_transitions(trajectories, torch.arange(16).repeat_interleave(10)[:20], steps)
    with torch.no_grad():  # move the adapter away from zero so the policy differs from the pretrained model
        for parameter in backend.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
    _, metrics = method.loss(batch, torch.Generator().manual_seed(1))
    timestep = kernel.timestep_of_state(batch.step)
    abar = backend.schedule.alphas_cumprod[timestep].float()[:, None]
    with torch.no_grad():
        residual = (backend.eps(batch.state, timestep, batch.cond) - backend.eps(batch.state, timestep, batch.cond, False)
                    + (1 - abar).sqrt() * method.exact_flow_score(batch.state, timestep))
    assert metrics["loss/forward"] == pytest.approx((residual**2).mean().item(), rel=1e-5)
