"""Flow-matching kernels (Flow-GRPO's SDE, its CPS variant, the flow noising kernel) and the mixture's exact velocity,
against diffusers, torch.distributions, autograd and the ground-truth marginals of Gaussian mixtures."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import check_noising_kernel
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from nablagfn.eval.gmm import mode_weight_tv
from nablagfn.mdp import FlowCPSKernel, FlowDDPMKernel, FlowSDEKernel, NoisingKernel
from nablagfn.mixture import GaussianMixture

_ANGLES = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
# an 8-mode ring with unequal weights 1 : 2 : … : 8 (so that mode histograms can see a wrong marginal) ...
RING = GaussianMixture(
    torch.stack([3 * _ANGLES.cos(), 3 * _ANGLES.sin()], 1), torch.full((8,), 0.3), torch.arange(1, 9.0)
)
# ... and an asymmetric three-component mixture with different spreads
ASYMMETRIC = GaussianMixture(
    torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]]), torch.tensor([0.4, 0.7, 0.3]), torch.tensor([0.5, 0.3, 0.2])
)
MIXTURES = {"ring": RING, "asymmetric": ASYMMETRIC}


@functools.cache
def kernel(kind: str, steps: int, noise_level: float, shift: float = 1.0):
    if kind == "ddpm":
        return FlowDDPMKernel(steps, shift=shift)
    cls = {"sde": FlowSDEKernel, "cps": FlowCPSKernel}[kind]
    return cls(steps, noise_level=noise_level, shift=shift)


KERNELS = [("sde", 10, 0.7, 1.0), ("sde", 20, 1.0, 3.0), ("sde", 7, 0.3, 3.0), ("cps", 10, 0.7, 3.0),
           ("ddpm", 10, 0.0, 1.0), ("ddpm", 12, 0.0, 3.0)]


def _scheduler(steps: int, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def _stochastic_steps(k, generator: torch.Generator) -> torch.Tensor:
    """Every step with non-zero std once, shuffled, plus a few repeats (mixed per-sample steps)."""
    valid = torch.nonzero(k.std > 0).flatten()
    steps = torch.cat([valid, valid[torch.randint(0, len(valid), (5,), generator=generator)]])
    return steps[torch.randperm(len(steps), generator=generator)]


# -- the grid -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [10, 28])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_sigmas_and_timesteps_are_diffusers_flow_match_euler_ones(kind, steps, shift):
    k = kernel(kind, steps, 0.7, shift)
    scheduler = _scheduler(steps, shift)
    assert k.num_steps == steps and k.state_sigmas.shape == (steps + 1,) and k.state_timesteps.shape == (steps + 1,)
    assert k.state_sigmas.dtype == torch.float64 and k.state_timesteps.is_floating_point()
    assert torch.equal(k.state_sigmas, scheduler.sigmas.double())
    assert torch.equal(k.state_timesteps[:-1], scheduler.timesteps) and float(k.state_timesteps[-1]) == 0.0
    assert float(k.state_sigmas[0]) == 1.0 and float(k.state_sigmas[-1]) == 0.0
    # diffusers' timesteps are σ · num_train_timesteps
    torch.testing.assert_close(k.state_timesteps.double(), 1000 * k.state_sigmas, rtol=1e-6, atol=1e-4)
    # timestep_of_state / sigma_of_state index the float tables per sample
    index = torch.tensor([0, steps, 3, 3, 1])
    assert torch.equal(k.timestep_of_state(index), k.state_timesteps[index])
    assert k.timestep_of_state(index).is_floating_point() and float(k.timestep_of_state(index)[1]) == 0.0
    assert torch.equal(k.sigma_of_state(index), k.state_sigmas[index])


def test_shift_three_is_sd3_shifted_grid():
    """Shifted sigmas are shift·u/(1 + (shift − 1)·u) of a uniform u grid (diffusers' u runs from 1 down to the
    *shifted* training σ_min, so it is not the shift-1 grid: one reason to take the grid from diffusers)."""
    unshifted, shifted = kernel("sde", 10, 0.7, 1.0), kernel("sde", 10, 0.7, 3.0)
    s = shifted.state_sigmas[:-1]
    u = s / (3 - 2 * s)  # the inverse shift
    torch.testing.assert_close(u.diff(), u.diff().mean().expand(9), rtol=1e-5, atol=1e-7)
    assert float(u[0]) == 1.0 and (shifted.state_sigmas[1:-1] > unshifted.state_sigmas[1:-1]).all()


# -- the tables against the published formulas -------------------------------------------------------------------
def _flow_grpo_sde_reference(x, v, sigmas, i, noise_level):
    """Flow-GRPO's SDE step written out element by element (python floats; σ = 1 → sigmas[1] in the denominator)."""
    sigma, sigma_prev, sigma_max = float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[1])
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * math.sqrt(-dt)


def _flow_cps_reference(x, v, sigmas, i, noise_level):
    sigma, sigma_prev = float(sigmas[i]), float(sigmas[i + 1])
    std = sigma_prev * math.sin(noise_level * math.pi / 2)
    x0, x1 = x - sigma * v, x + v * (1 - sigma)
    return x0 * (1 - sigma_prev) + x1 * math.sqrt(max(sigma_prev**2 - std**2, 0.0)), std


@pytest.mark.parametrize("kind,steps,noise_level,shift",
                         [k for k in KERNELS if k[0] != "ddpm"] + [("cps", 6, 1.0, 1.0), ("sde", 1, 0.7, 1.0)])
def test_tables_reproduce_the_published_step(kind, steps, noise_level, shift):
    k = kernel(kind, steps, noise_level, shift)
    reference = _flow_grpo_sde_reference if kind == "sde" else _flow_cps_reference
    g = torch.Generator().manual_seed(0)
    x, v = (
        torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
    )
    for i in range(steps):
        expected_mean, expected_std = reference(x, v, k.state_sigmas, i, noise_level)
        step = torch.full((3,), i)
        torch.testing.assert_close(k.mean(x, v, step), expected_mean, rtol=1e-12, atol=1e-12, msg=f"mean, step {i}")
        torch.testing.assert_close(float(k.std[i]), expected_std, rtol=1e-12, atol=1e-15, msg=f"std, step {i}")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_zero_noise_is_diffusers_euler_step(kind, shift):
    """a = 0: both variants reduce to the probability-flow ODE's Euler step x + v·dt, i.e. diffusers' own ``step``."""
    k = kernel(kind, 12, 0.0, shift)
    assert (k.std == 0).all()
    scheduler = _scheduler(12, shift)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(4, 3, generator=g)
        theirs = scheduler.step(v, t, x).prev_sample
        ours = k.mean(x.double(), v.double(), torch.full((4,), i))
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-6, msg=f"step {i}")
        x = theirs


def test_last_sde_step_std_is_tiny_but_nonzero_and_deterministic_steps_refuse_log_probs():
    for steps, shift in [(10, 1.0), (20, 3.0)]:
        k = kernel("sde", steps, 0.7, shift)
        assert (k.std > 0).all() and torch.isfinite(k.std).all()
        assert 0 < float(k.std[-1]) < 0.05 and float(k.std[-1]) < float(k.std[:-1].min())
        step = torch.full((2,), steps - 1)
        assert torch.isfinite(k.log_prob(torch.full((2, 2), 0.01, dtype=torch.float64), torch.zeros(2, 2), step)).all()
    cps = kernel("cps", 10, 0.7, 3.0)
    assert (cps.std[:-1] > 0).all() and float(cps.std[-1]) == 0.0  # σ_next = 0 ⇒ deterministic last step
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="deterministic"):
        cps.log_prob(zeros, zeros, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="deterministic"):
        cps.forward_score(zeros, zeros, torch.tensor([9, 9]))
    assert torch.isfinite(cps.log_prob(zeros + 0.01, zeros, torch.tensor([0, 8]))).all()
    with pytest.raises(ValueError, match="deterministic"):
        kernel("sde", 10, 0.0, 1.0).log_prob(zeros, zeros, torch.tensor([0, 1]))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        FlowSDEKernel(0)
    with pytest.raises(ValueError):
        FlowSDEKernel(10, noise_level=-0.1)
    with pytest.raises(ValueError):
        FlowCPSKernel(10, noise_level=1.5)
    with pytest.raises(ValueError):
        FlowSDEKernel(10, shift=0.0)


# -- densities and scores ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,steps,noise_level,shift", KERNELS)
def test_log_prob_matches_torch_normal_summed_over_non_batch_dims(kind, steps, noise_level, shift):
    k = kernel(kind, steps, noise_level, shift)
    g = torch.Generator().manual_seed(2)
    step = _stochastic_steps(k, g)
    for shape in [(2,), (3, 2)]:
        mean = torch.randn((len(step), *shape), generator=g, dtype=torch.float64)
        std = k.std[step].reshape(-1, *([1] * len(shape)))
        x_next = mean + 2 * std * torch.randn(mean.shape, generator=g, dtype=torch.float64)
        x_next[:3] += 0.5
        expected = Independent(Normal(mean, std.expand_as(mean)), len(shape)).log_prob(x_next)
        got = k.log_prob(x_next, mean, step)
        assert got.shape == (len(step),)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("kind,steps,noise_level,shift", KERNELS)
def test_forward_score_is_gradient_of_log_prob(kind, steps, noise_level, shift):
    k = kernel(kind, steps, noise_level, shift)
    g = torch.Generator().manual_seed(3)
    step = _stochastic_steps(k, g)
    mean = torch.randn((len(step), 2), generator=g, dtype=torch.float64)
    x_next = (mean + k.std[step, None] * torch.randn(mean.shape, generator=g, dtype=torch.float64)).requires_grad_()
    (autograd_score,) = torch.autograd.grad(k.log_prob(x_next, mean, step).sum(), x_next)
    torch.testing.assert_close(k.forward_score(x_next.detach(), mean, step), autograd_score, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind,steps,noise_level,shift", KERNELS)
def test_reverse_score_and_mean_vjp_for_a_nonlinear_velocity(kind, steps, noise_level, shift):
    """v(x) = tanh(A x): ∇_x log P(x_next | x) = Jᵀ (x_next − μ)/σ² and J_μᵀ u with J = a I + b diag(1 − v²) A."""
    k = kernel(kind, steps, noise_level, shift)
    g = torch.Generator().manual_seed(4)
    dim = 3
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    step = _stochastic_steps(k, g)
    batch = len(step)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)

    def velocity(inp):
        return torch.tanh(inp @ A.T)

    a, b, var = k.x_coef[step], k.eps_coef[step], k.std[step] ** 2
    mean = k.mean(x, velocity(x), step)
    x_next = mean + var.sqrt()[:, None] * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    jac = a[:, None, None] * torch.eye(dim, dtype=torch.float64) + b[:, None, None] * (
        (1 - velocity(x) ** 2)[:, :, None] * A
    )
    expected = torch.einsum("bji,bj->bi", jac, (x_next - mean) / var[:, None])
    torch.testing.assert_close(k.reverse_score(x, x_next, step, velocity), expected, rtol=1e-9, atol=1e-9)
    u = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(k.mean_vjp(x, u, step, velocity), torch.einsum("bji,bj->bi", jac, u))


# -- the flow noising kernel ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,shift", [(10, 1.0), (20, 3.0)])
def test_flow_noising_kernel_density_scores_and_marginals(steps, shift):
    k = kernel("sde", steps, 0.7, shift)
    noising = NoisingKernel(k)
    step = torch.tensor([0, 1, steps // 2, steps - 1])
    sigma, sigma_next = k.state_sigmas[step], k.state_sigmas[step + 1]
    coef = (1 - sigma) / (1 - sigma_next)
    torch.testing.assert_close(noising.coef(step), coef, rtol=1e-14, atol=0)
    torch.testing.assert_close(noising.variance(step), sigma**2 - coef**2 * sigma_next**2, rtol=1e-12, atol=1e-15)
    assert float(noising.coef(step)[0]) == 0.0 and float(noising.variance(step)[0]) == 1.0  # σ_0 = 1: pure noise
    assert (noising.variance(torch.arange(steps)) > 0).all()

    g = torch.Generator().manual_seed(5)
    x, x_next = (torch.randn(4, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    check_noising_kernel(noising, x, x_next, step, coef, noising.variance(step))

    # P_B carries the interpolant's marginal at σ_{k+1} to the one at σ_k, component by component (so exactly)
    for mixture in MIXTURES.values():
        means_next, vars_next = mixture.noised_flow(sigma_next)
        means_here, vars_here = mixture.noised_flow(sigma)
        torch.testing.assert_close(coef[:, None, None] * means_next, means_here, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            coef[:, None] ** 2 * vars_next + noising.variance(step)[:, None], vars_here, rtol=1e-12, atol=1e-12
        )
    # and its sampler draws from N(c x_{k+1}, s² I)
    many = torch.full((20000,), steps // 2)
    draws = noising.sample(torch.ones(20000, 2, dtype=torch.float64), many, torch.Generator().manual_seed(6))
    torch.testing.assert_close(draws.mean(0), coef[2].expand(2), rtol=0, atol=0.03)
    torch.testing.assert_close(draws.var(0), noising.variance(step)[2].expand(2), rtol=0.05, atol=0)


# -- the mixture's flow density and exact velocity -----------------------------------------------------------------
def _reference_flow_log_prob(mixture: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    scale = ((1 - sigma) ** 2 * mixture.stds**2 + sigma**2).sqrt()[:, None].expand(-1, mixture.dim)
    components = Independent(Normal((1 - sigma) * mixture.means, scale), 1)
    return MixtureSameFamily(Categorical(probs=mixture.weights), components).log_prob(x)


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.7, 0.97])
def test_flow_log_prob_against_torch_and_the_vp_marginal(name, sigma):
    mixture = MIXTURES[name]
    g = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    got = mixture.log_prob_flow(x, sigma)
    torch.testing.assert_close(got, _reference_flow_log_prob(mixture, x, sigma), rtol=1e-12, atol=1e-12)
    # x_σ = λ x_t^VP with λ² = (1 − σ)² + σ², ᾱ = (1 − σ)²/λ²: log p_σ(x) = log p_ᾱ(x/λ) − d log λ
    scale = math.sqrt((1 - sigma) ** 2 + sigma**2)
    abar = torch.full((64,), (1 - sigma) ** 2 / scale**2, dtype=torch.float64)
    torch.testing.assert_close(got, mixture.log_prob(x / scale, abar) - 2 * math.log(scale), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixture.log_prob_flow(x, torch.full((64,), sigma, dtype=torch.float64)), got)


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("sigma", [0.02, 0.3, 0.7, 0.98])
def test_exact_velocity_from_the_score_by_autograd(name, sigma):
    """E[ε | x] = −σ ∇log p_σ(x) and E[x₀ | x] = (x − σ E[ε | x])/(1 − σ), so v = −(x + σ ∇log p_σ(x))/(1 − σ);
    the score here is autograd of log_prob_flow, and also the VP closed-form score rescaled."""
    mixture = MIXTURES[name]
    g = torch.Generator().manual_seed(8)
    x = (3 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_()
    (score,) = torch.autograd.grad(mixture.log_prob_flow(x, sigma).sum(), x)
    x = x.detach()
    velocity = mixture.velocity(x, sigma)
    torch.testing.assert_close(velocity, -(x + sigma * score) / (1 - sigma), rtol=1e-9, atol=1e-9)
    scale = math.sqrt((1 - sigma) ** 2 + sigma**2)
    abar = torch.full((64,), (1 - sigma) ** 2 / scale**2, dtype=torch.float64)
    torch.testing.assert_close(mixture.score(x / scale, abar) / scale, score, rtol=1e-9, atol=1e-9)
    # per-sample σ and float32 inputs
    torch.testing.assert_close(mixture.velocity(x, torch.full((64,), sigma, dtype=torch.float64)), velocity)
    v32 = mixture.velocity(x.float(), sigma)
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), velocity, rtol=1e-5, atol=1e-5)


def test_exact_velocity_at_the_ends():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    for mixture in MIXTURES.values():
        # σ = 1: x_σ = ε is independent of x₀, so v = x − E[x₀]
        torch.testing.assert_close(mixture.velocity(x, 1.0), x - mixture.weights @ mixture.means)
        # σ = 0: x_σ = x₀ is independent of ε, so v = −x
        torch.testing.assert_close(mixture.velocity(x, 0.0), -x)


# -- ground truth: the law of the samples --------------------------------------------------------------------------
def _final_gaussian_law(k, mixture: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and variance (per coordinate) of x_K, exactly, when x_0 ~ N(0, I) and v is the exact velocity of a
    single isotropic Gaussian (then v is affine in x and every step is a linear Gaussian map)."""
    mean = torch.zeros(mixture.dim, dtype=torch.float64)
    variance = torch.tensor(1.0, dtype=torch.float64)
    basis = torch.cat([torch.zeros(1, mixture.dim), torch.eye(mixture.dim)[:1]]).double()
    for i in range(k.num_steps):
        v = mixture.velocity(basis, k.state_sigmas[i])
        slope, intercept = v[1, 0] - v[0, 0], v[0]
        gain = k.x_coef[i] + k.eps_coef[i] * slope
        mean = gain * mean + k.eps_coef[i] * intercept
        variance = gain**2 * variance + k.std[i] ** 2
    return mean, variance


SINGLE = GaussianMixture(torch.tensor([[1.0, -0.5]]), torch.tensor([0.5]), torch.ones(1))


@pytest.mark.parametrize("noise_level", [0.0, 0.3, 0.7, 1.0])
def test_sde_final_law_converges_to_the_data_for_a_gaussian(noise_level):
    """Exact propagation of the Gaussian law through the tables: the mean is exact, the variance error shrinks with
    the step count (relative error 2.8–28 % at 10 steps, under 3 % at 100 steps)."""
    errors = []
    for steps in (10, 100):
        mean, variance = _final_gaussian_law(kernel("sde", steps, noise_level, 1.0), SINGLE)
        torch.testing.assert_close(mean, SINGLE.means[0], rtol=1e-9, atol=1e-9)
        errors.append(abs(float(variance) / 0.25 - 1))
    assert errors[1] < 0.03 and errors[1] < errors[0]


def test_cps_preserves_the_noise_coefficients_but_not_the_marginals():
    """CPS re-noises a fixed fraction sin(aπ/2) of the noise from the posterior mean x̂₀ at every step, so for a > 0
    its samples are too concentrated and more steps do not fix it (as published; a = 0 is the Euler ODE). Final
    variance / data variance for N(m, 0.5² I) data: ≈ 0.70 → 0.72 (a = 0.7) and 0.48 → 0.49 (a = 1) from 100 to 400
    steps, where the SDE is within 3 % at 100 steps."""
    for noise_level, (low, high) in [(0.7, (0.6, 0.8)), (1.0, (0.4, 0.55))]:
        ratios = [
            float(_final_gaussian_law(kernel("cps", steps, noise_level, 1.0), SINGLE)[1]) / 0.25 for steps in (100, 400)
        ]
        assert all(low < r < high for r in ratios) and abs(ratios[1] - ratios[0]) < 0.05, ratios
    torch.testing.assert_close(kernel("cps", 10, 0.0, 1.0).x_coef, kernel("sde", 10, 0.0, 1.0).x_coef)
    torch.testing.assert_close(kernel("cps", 10, 0.0, 1.0).eps_coef, kernel("sde", 10, 0.0, 1.0).eps_coef)


NUM_SAMPLES = 4000


def _sample(k, mixture: GaussianMixture, seed: int) -> torch.Tensor:
    """x_0 ~ N(0, I) (σ_0 = 1 exactly) through the kernel with the exact velocity, float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_SAMPLES, mixture.dim, generator=g, dtype=torch.float64)
    for i in range(k.num_steps):
        x, _ = k.step(x, mixture.velocity(x, k.state_sigmas[i]), torch.full((NUM_SAMPLES,), i), generator=g)
    return x


@functools.cache
def _reference(name: str) -> tuple[torch.Tensor, float]:
    """An exact sample of the mixture and the two-sample floor: the mean mode-weight TV of 10 pairs of exact samples."""
    mixture = MIXTURES[name]
    g = torch.Generator().manual_seed(10)
    pairs = [(mixture.sample(NUM_SAMPLES, g), mixture.sample(NUM_SAMPLES, g)) for _ in range(10)]
    floor = sum(mode_weight_tv(a, b, mixture) for a, b in pairs) / len(pairs)
    return mixture.sample(NUM_SAMPLES, g).double(), floor


def _limit(floor: float) -> float:
    return 2 * floor + 0.01


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize(
    "noise_level,steps",
    [(a, k) for a in (0.3, 0.7, 1.0) for k in (20, 50, 100)] + [(0.0, 20), (0.0, 100)],
)
def test_flow_sde_with_the_exact_velocity_samples_the_mixture(name, noise_level, steps):
    mixture = MIXTURES[name]
    reference, floor = _reference(name)
    samples = _sample(kernel("sde", steps, noise_level, 1.0), mixture, seed=steps + int(100 * noise_level))
    tv = mode_weight_tv(samples, reference, mixture)
    assert tv <= _limit(floor), f"mode TV {tv:.4f} vs two-sample floor {floor:.4f}"


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("steps", [20, 50])
def test_flow_ddpm_with_the_exact_velocity_samples_the_mixture(name, steps):
    mixture = MIXTURES[name]
    reference, floor = _reference(name)
    tv = mode_weight_tv(_sample(kernel("ddpm", steps, 0.0, 1.0), mixture, seed=steps), reference, mixture)
    assert tv <= _limit(floor), f"mode TV {tv:.4f} vs two-sample floor {floor:.4f}"


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_ddpm_step_is_the_posterior_of_the_interpolant_noising(shift):
    """For data x₀ and x_σ' = (1 − σ') x₀ + σ' ε', x_σ = c x_σ' + √w z: the step with the velocity that predicts x₀
    exactly (x̂₀ = x₀) is the Gaussian conditional of x_σ' given (x_σ, x₀), computed here from the joint covariance."""
    k = kernel("ddpm", 10, 0.0, shift)
    for i in range(k.num_steps - 1):  # the last step keeps a tiny std instead of the (zero) posterior one
        sigma, sigma_next = float(k.sigma[i]), float(k.sigma_next[i])
        coef = (1 - sigma) / (1 - sigma_next)
        w = sigma**2 - coef**2 * sigma_next**2
        # (x_σ', x_σ) given x₀ are jointly Gaussian per element: var σ'², cov c σ'², var σ²
        gain = coef * sigma_next**2 / sigma**2
        posterior_var = sigma_next**2 - gain * coef * sigma_next**2
        x0, x = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
        posterior_mean = (1 - sigma_next) * x0 + gain * (x - (1 - sigma) * x0)
        velocity = (x - x0) / sigma  # x̂₀ = x − σ v = x₀
        mean = k.mean(x[None], velocity[None], torch.tensor([i]))
        torch.testing.assert_close(mean[0], posterior_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(k.std[i] ** 2, torch.tensor(posterior_var, dtype=torch.float64), rtol=1e-9,
                                   atol=1e-15)
        assert w > 0
    last = float(k.sigma[-1])  # to σ = 0: the Flow-SDE's std at a = √2, g√σ with g² = 2σ/(1 − σ)
    assert float(k.std[-1]) == pytest.approx(last * math.sqrt(2 / (1 - last)), rel=1e-12)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_marginal_test_rejects_an_sde_without_the_score_correction(name):
    """The same test's power: noise added to the Euler step without the drift's score term (x + v dt + g√−dt z) has
    the wrong marginals, and the mode histogram sees it."""
    mixture = MIXTURES[name]
    reference, floor = _reference(name)
    broken = FlowSDEKernel(50, noise_level=1.0)
    broken.x_coef = torch.ones_like(broken.x_coef)
    broken.eps_coef = broken.sigma_next - broken.sigma
    tv = mode_weight_tv(_sample(broken, mixture, seed=0), reference, mixture)
    assert tv > _limit(floor) + 0.02, f"mode TV {tv:.4f} vs two-sample floor {floor:.4f}"


@pytest.mark.parametrize("image_tokens,steps", [(4096, 28), (1024, 10)])
def test_a_dynamic_shift_gives_fluxpipelines_grid(image_tokens, steps):
    """FLUX's scheduler shifts by μ (from the image's token count): the kernels built with ``mu`` take FluxPipeline's
    sigmas and timesteps (its ``retrieve_timesteps`` on linspace(1, 1/K, K)), which differ from a fixed shift's."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    mu = calculate_shift(image_tokens, 256, 4096, 0.5, 1.15)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    for kernel_class in (FlowSDEKernel, FlowDDPMKernel):
        k = kernel_class(steps, mu=mu)
        torch.testing.assert_close(k.state_sigmas.float(), scheduler.sigmas, rtol=0, atol=0)
        torch.testing.assert_close(k.state_timesteps[:-1], timesteps, rtol=0, atol=0)
    assert not torch.allclose(FlowSDEKernel(steps, shift=math.exp(mu)).state_sigmas, FlowSDEKernel(steps, mu=mu).state_sigmas)
