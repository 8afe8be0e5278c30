"""Gaussian-mixture backend: exact pretrained ε, exact reward tilts, zero-initialised adapters."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from nablagfn.backends import GaussianMixture, GaussianMixtureBackend
from nablagfn.config_loading import load_config
from nablagfn.eval.gmm import mode_weights
from nablagfn.mdp import NoiseSchedule
from nablagfn.rewards.vector import GaussianReward, GridDensity, LinearReward, exact_target
from nablagfn.train.run import Run

MEANS = [[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]]
STDS = [0.4, 0.7, 0.3]
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture(MEANS, STDS, WEIGHTS)


@pytest.fixture(scope="module")
def linear_schedule() -> NoiseSchedule:
    return NoiseSchedule.make("linear")


def reference_log_prob(x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """log p_t(x) of the VP-noised mixture via torch.distributions, one ᾱ per sample."""
    means = torch.tensor(MEANS, dtype=torch.float64)
    stds = torch.tensor(STDS, dtype=torch.float64)
    out = []
    for xi, ai in zip(x, abar):
        scale = (ai * stds**2 + 1 - ai).sqrt()[:, None].expand(-1, 2)
        components = Independent(Normal(ai.sqrt() * means, scale), 1)
        mix = MixtureSameFamily(Categorical(probs=torch.tensor(WEIGHTS, dtype=torch.float64)), components)
        out.append(mix.log_prob(xi))
    return torch.stack(out)


def test_mixture_log_prob_matches_torch_distributions(mixture, linear_schedule):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (16,), generator=g)
    abar = linear_schedule.alphas_cumprod[t]
    x = 2 * torch.randn((16, 2), generator=g, dtype=torch.float64)
    torch.testing.assert_close(mixture.log_prob(x, abar), reference_log_prob(x, abar), rtol=1e-10, atol=1e-10)
    # abar=None is the clean density
    torch.testing.assert_close(mixture.log_prob(x), reference_log_prob(x, torch.ones(16, dtype=torch.float64)))


def test_pretrained_eps_is_scaled_score_of_noised_mixture(mixture, linear_schedule):
    backend = GaussianMixtureBackend(mixture, linear_schedule, hidden=16, layers=1)
    g = torch.Generator().manual_seed(1)
    t = torch.cat([torch.tensor([0, 1, 500, 999]), torch.randint(0, 1000, (12,), generator=g)])
    abar = linear_schedule.alphas_cumprod[t]
    x = (2 * torch.randn((t.shape[0], 2), generator=g, dtype=torch.float64)).requires_grad_()
    (score,) = torch.autograd.grad(mixture.log_prob(x, abar).sum(), x)
    expected = -(1 - abar).sqrt()[:, None] * score
    eps = backend.pretrained_eps(x.detach(), t)
    assert eps.dtype == torch.float64
    torch.testing.assert_close(eps, expected, rtol=1e-9, atol=1e-12)
    # float32 input gives float32 output with the same values
    torch.testing.assert_close(backend.pretrained_eps(x.detach().float(), t).double(), expected, rtol=1e-5, atol=1e-6)
    # and the adapter is off at initialisation: finetuned ε == pretrained ε exactly
    cond = torch.zeros(t.shape[0], dtype=torch.long)
    xf = x.detach().float()
    assert torch.equal(backend.eps(xf, t, cond, finetuned=True), backend.eps(xf, t, cond, finetuned=False))


# -- exact tilts --------------------------------------------------------------------------------------------------
def _grid(half_width: float = 8.0, n: int = 400):
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    cell = (axis[1] - axis[0]) ** 2
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), cell


def _numerically_normalised(log_unnormalised: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    density = torch.exp(log_unnormalised - log_unnormalised.max())
    return density / (density.sum() * cell)


REWARDS = {
    "gaussian": lambda: GaussianReward([1.0, 0.5], 1.2),
    "linear": lambda: LinearReward([0.8, -0.6]),
}


def reference_log_reward(reward, x: torch.Tensor) -> torch.Tensor:
    """log R written out independently, in float64 (with the reward's float32-stored parameters)."""
    if isinstance(reward, GaussianReward):
        return -((x - reward.center.double()) ** 2).sum(-1) / (2 * reward.scale**2)
    return x @ reward.direction.double()


@pytest.mark.parametrize("reward_name", sorted(REWARDS))
def test_reward_values(reward_name):
    reward = REWARDS[reward_name]()
    x = torch.tensor([[0.0, 0.0], [1.0, 0.5], [2.0, -1.0]])
    cond = torch.zeros(3, dtype=torch.long)
    expected = {"gaussian": [-(1.0 + 0.25) / (2 * 1.44), 0.0, -(1.0 + 2.25) / (2 * 1.44)],
                "linear": [0.0, 0.8 - 0.3, 1.6 + 0.6]}[reward_name]
    torch.testing.assert_close(reward.log_reward(x, cond), torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reward(x, cond), reward.log_reward(x, cond))
    assert reward.differentiable


@pytest.mark.parametrize("reward_name", sorted(REWARDS))
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_exact_tilt_matches_numerically_normalised_density(mixture, reward_name, beta):
    reward = REWARDS[reward_name]()
    grid, cell = _grid()
    log_target = mixture.log_prob(grid) + beta * reference_log_reward(reward, grid)
    expected = _numerically_normalised(log_target, cell)

    tilted = reward.tilt(mixture, beta)
    assert math.isclose(float(tilted.weights.sum()), 1.0, rel_tol=1e-12)
    density = tilted.log_prob(grid).exp()
    assert math.isclose(float(density.sum() * cell), 1.0, rel_tol=1e-6)  # the box holds all the mass
    assert (density - expected).abs().max() < 1e-6 * expected.max()
    # exact_target with prior_strength = 1 is this tilt
    target = exact_target(mixture, reward, beta, prior_strength=1.0)
    torch.testing.assert_close(target.log_prob(grid), tilted.log_prob(grid))


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_exact_target_without_prior_is_the_reward_gaussian(mixture, beta):
    reward = GaussianReward([1.0, 0.5], 1.2)
    target = exact_target(mixture, reward, beta, prior_strength=0.0)
    center = torch.tensor([1.0, 0.5], dtype=torch.float32).double()
    torch.testing.assert_close(target.means, center[None])
    torch.testing.assert_close(target.stds, torch.tensor([1.2 / beta**0.5], dtype=torch.float64))
    grid, cell = _grid(half_width=14.0, n=500)  # R^β alone is wide (std up to 1.7)
    expected = _numerically_normalised(beta * reference_log_reward(reward, grid), cell)
    assert (target.log_prob(grid).exp() - expected).abs().max() < 1e-6 * expected.max()


def test_exact_target_is_none_without_closed_form(mixture):
    assert exact_target(mixture, LinearReward([1.0, 0.0]), 1.0, prior_strength=0.0) is None


@pytest.mark.parametrize("reward", [GaussianReward([0.0, 0.0], 1.0), LinearReward([1.0, -0.5])])
def test_grid_target_for_fractional_prior_strength(mixture, reward):
    """0 < η < 1: R^β·p^η tabulated on a grid. At η → 1 its samples match the closed-form tilt's; at η = 0.5
    their moments match a numerical integration of the density."""
    generator = torch.Generator().manual_seed(0)
    near_one = exact_target(mixture, reward, 0.7, prior_strength=1 - 1e-9)
    exact = reward.tilt(mixture, 0.7)
    assert isinstance(near_one, GridDensity)
    grid_samples, exact_samples = near_one.sample(200_000, generator), exact.sample(200_000, generator)
    torch.testing.assert_close(grid_samples.mean(0), exact_samples.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(grid_samples.std(0), exact_samples.std(0), atol=0.01, rtol=0)

    half = exact_target(mixture, reward, 0.7, prior_strength=0.5)
    grid, cell = _grid(half_width=10.0, n=800)
    density = _numerically_normalised(0.5 * mixture.log_prob(grid) + 0.7 * reference_log_reward(reward, grid), cell)
    mean = (density[:, None] * grid).sum(0) * cell
    torch.testing.assert_close(half.sample(200_000, generator).double().mean(0), mean, atol=0.01, rtol=0)


# -- zero-initialised adapters ------------------------------------------------------------------------------------
def test_zero_residual_gives_pretrained_samples_until_perturbed(small_run_overrides):
    run = Run.build(load_config(None, small_run_overrides))
    finetuned = run.sample(300, seed=11, finetuned=True)
    pretrained = run.sample(300, seed=11, finetuned=False)
    assert finetuned.shape == (300, 2)
    assert torch.equal(finetuned, pretrained)
    assert torch.equal(run.sample(300, seed=11, finetuned=True), finetuned)  # reproducible from the seed
    assert not torch.equal(run.sample(300, seed=12, finetuned=True), finetuned)

    with torch.no_grad():
        out = run.backend.residual.out
        out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        out.bias.fill_(0.3)
    perturbed = run.sample(300, seed=11, finetuned=True)
    assert (perturbed - pretrained).abs().max() > 1e-2
    # the pretrained sampler ignores the adapter
    assert torch.equal(run.sample(300, seed=11, finetuned=False), pretrained)


def test_flow_score_net_starts_at_exactly_zero(mixture, linear_schedule, small_run_overrides):
    backend = GaussianMixtureBackend(mixture, linear_schedule, hidden=32, layers=2)
    net = backend.make_flow_score_net()
    g = torch.Generator().manual_seed(2)
    x = 3 * torch.randn((64, 2), generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    out = net(x, t)
    assert out.shape == (64, 2)
    assert torch.equal(out, torch.zeros_like(out))
    assert any(p.requires_grad for p in net.parameters())
    # a fresh net each call (not the policy's residual)
    assert {id(p) for p in net.parameters()}.isdisjoint({id(p) for p in backend.trainable_parameters()})
    # the method's g_φ in a fresh run is zero as well
    run = Run.build(load_config(None, small_run_overrides))
    flow = run.method.networks["flow_score"]
    assert torch.equal(flow(x, t), torch.zeros_like(x))


@pytest.mark.parametrize(
    "sampler", [["sampler.kind=ddpm", "sampler.steps=50"], ["sampler.kind=dpm_solver", "sampler.steps=20"]]
)
def test_pretrained_sampler_reproduces_mixture_mode_weights(sampler):
    """End to end: exact ε + kernel ⇒ samples land on the modes with the mixture's weights."""
    overrides = ["model.kind=gmm", f"model.means={MEANS}", f"model.stds={STDS}", f"model.weights={WEIGHTS}", "model.hidden=8",
                 "model.layers=1", "reward.center=[0.0, 0.0]", *sampler]
    run = Run.build(load_config(None, overrides))
    samples = run.sample(4000, seed=0, finetuned=False)
    weights = mode_weights(samples, run.backend.mixture)
    assert 0.5 * (weights - run.backend.mixture.weights).abs().sum() < 0.04
    # and each mode has roughly its std
    nearest = run.backend.mixture.nearest_mode(samples)
    for k, std in enumerate(STDS):
        spread = (samples[nearest == k].double() - torch.tensor(MEANS[k], dtype=torch.float64)).std(0).mean()
        assert abs(float(spread) - std) < 0.15 * std + 0.03
