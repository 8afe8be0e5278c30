"""Gaussian transition kernels (DDIM / SDE-DPM-Solver++): densities, scores, and agreement with diffusers."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import check_noising_kernel
from torch.distributions import Independent, Normal

from nablagfn.mdp import DDIMKernel, NoiseSchedule, SDEDPMSolverKernel, make_kernel

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}


@functools.lru_cache(maxsize=None)
def schedule(kind: str) -> NoiseSchedule:
    if kind == "scaled_linear":
        return NoiseSchedule.make("scaled_linear", 1000, **SD_BETAS)
    return NoiseSchedule.make(kind)


@functools.lru_cache(maxsize=None)
def kernel(name: str):
    return {
        "ddim_linear_eta1": lambda: DDIMKernel(schedule("linear"), 50, eta=1.0),
        "ddim_linear_eta0.5": lambda: DDIMKernel(schedule("linear"), 50, eta=0.5),
        "ddim_scaled_eta1": lambda: DDIMKernel(schedule("scaled_linear"), 50, eta=1.0),
        "dpm_linear": lambda: SDEDPMSolverKernel(schedule("linear"), 20),
        "dpm_scaled": lambda: SDEDPMSolverKernel(schedule("scaled_linear"), 20),
    }[name]()


KERNELS = ["ddim_linear_eta1", "ddim_linear_eta0.5", "ddim_scaled_eta1", "dpm_linear", "dpm_scaled"]


def mixed_steps(num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """Every step index once, shuffled, plus a few random repeats (a batch with mixed per-sample steps)."""
    steps = torch.cat([torch.arange(num_steps), torch.randint(0, num_steps, (5,), generator=generator)])
    return steps[torch.randperm(steps.shape[0], generator=generator)]


# -- densities and scores ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", KERNELS)
def test_log_prob_matches_torch_normal_summed_over_non_batch_dims(name):
    k = kernel(name)
    g = torch.Generator().manual_seed(1)
    step = mixed_steps(k.num_steps, g)
    batch = step.shape[0]
    for shape in [(2,), (3, 2)]:
        mean = torch.randn((batch, *shape), generator=g, dtype=torch.float64)
        std = k.std.to(torch.float64)[step].reshape(-1, *([1] * len(shape)))
        # x_next near the mean on the kernel's own scale, plus some far-away points
        x_next = mean + std * 2 * torch.randn(mean.shape, generator=g, dtype=torch.float64)
        x_next[:3] += 0.5
        expected = Independent(Normal(mean, std.expand_as(mean)), len(shape)).log_prob(x_next)
        got = k.log_prob(x_next, mean, step)
        assert got.shape == (batch,)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("name", KERNELS)
def test_log_prob_float32_agrees_with_float64(name):
    k = kernel(name)
    g = torch.Generator().manual_seed(2)
    step = mixed_steps(k.num_steps, g)
    mean = torch.randn((step.shape[0], 2), generator=g, dtype=torch.float64)
    x_next = mean + k.std[step, None] * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    lp64 = k.log_prob(x_next, mean, step)
    lp32 = k.log_prob(x_next.float(), mean.float(), step)
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", KERNELS)
def test_forward_score_is_gradient_of_log_prob(name):
    k = kernel(name)
    g = torch.Generator().manual_seed(3)
    step = mixed_steps(k.num_steps, g)
    mean = torch.randn((step.shape[0], 2), generator=g, dtype=torch.float64)
    x_next = (mean + k.std[step, None] * torch.randn(mean.shape, generator=g, dtype=torch.float64)).requires_grad_()
    (autograd_score,) = torch.autograd.grad(k.log_prob(x_next, mean, step).sum(), x_next)
    torch.testing.assert_close(k.forward_score(x_next.detach(), mean, step), autograd_score, rtol=1e-10, atol=1e-10)
    # and the closed form −(x_next − μ)/σ²
    closed = -(x_next.detach() - mean) / k.std[step, None] ** 2
    torch.testing.assert_close(autograd_score, closed, rtol=1e-10, atol=1e-10)


def _linear_model(dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((dim, dim), generator=generator, dtype=torch.float64) / dim**0.5


@pytest.mark.parametrize("name", KERNELS)
def test_reverse_score_and_mean_vjp_for_linear_model(name):
    """ε(x) = A x ⇒ μ = a x + b A x, ∇_x log P(x_next|x) = (aI + bA)ᵀ (x_next − μ)/σ², J_μᵀ v = (aI + bA)ᵀ v."""
    k = kernel(name)
    g = torch.Generator().manual_seed(4)
    dim = 3
    A = _linear_model(dim, g)
    step = mixed_steps(k.num_steps, g)
    batch = step.shape[0]
    x = torch.randn((batch, dim), generator=g, dtype=torch.float64)
    a, b = k.x_coef[step].double(), k.eps_coef[step].double()
    var = k.std[step].double() ** 2
    mean = a[:, None] * x + b[:, None] * (x @ A.T)
    torch.testing.assert_close(k.mean(x, x @ A.T, step), mean, rtol=1e-12, atol=1e-12)
    x_next = mean + var.sqrt()[:, None] * torch.randn((batch, dim), generator=g, dtype=torch.float64)
    jac = a[:, None, None] * torch.eye(dim, dtype=torch.float64) + b[:, None, None] * A  # (B, d, d)
    expected_score = torch.einsum("bji,bj->bi", jac, (x_next - mean) / var[:, None])

    score = k.reverse_score(x, x_next, step, lambda inp: inp @ A.T)
    torch.testing.assert_close(score, expected_score, rtol=1e-9, atol=1e-9)
    assert not score.requires_grad

    v = torch.randn((batch, dim), generator=g, dtype=torch.float64)
    vjp = k.mean_vjp(x, v, step, lambda inp: inp @ A.T)
    torch.testing.assert_close(vjp, torch.einsum("bji,bj->bi", jac, v), rtol=1e-10, atol=1e-10)


def test_reverse_score_create_graph_differentiates_through_the_model():
    k = kernel("ddim_linear_eta1")
    g = torch.Generator().manual_seed(5)
    dim = 2
    A = _linear_model(dim, g).requires_grad_()
    step = mixed_steps(k.num_steps, g)
    batch = step.shape[0]
    x = torch.randn((batch, dim), generator=g, dtype=torch.float64)
    x_next = torch.randn((batch, dim), generator=g, dtype=torch.float64)
    weights = torch.randn((batch, dim), generator=g, dtype=torch.float64)

    score = k.reverse_score(x, x_next, step, lambda inp: inp @ A.T, create_graph=True)
    assert score.requires_grad
    (grad_A,) = torch.autograd.grad((score * weights).sum(), A)

    # closed form as a function of A, differentiated by autograd
    a, b, var = k.x_coef[step], k.eps_coef[step], k.std[step] ** 2
    mean = a[:, None] * x + b[:, None] * (x @ A.T)
    jac = a[:, None, None] * torch.eye(dim, dtype=torch.float64) + b[:, None, None] * A
    closed = torch.einsum("bji,bj->bi", jac, (x_next - mean) / var[:, None])
    (expected_grad_A,) = torch.autograd.grad((closed * weights).sum(), A)
    torch.testing.assert_close(grad_A, expected_grad_A, rtol=1e-8, atol=1e-8)


# -- agreement with diffusers -----------------------------------------------------------------------------------
def _ddim_scheduler(kind: str):
    from diffusers import DDIMScheduler

    betas = SD_BETAS if kind == "scaled_linear" else {"beta_start": 1e-4, "beta_end": 0.02}
    # clip_sample=False: diffusers' DDIM clips x̂0 to [-1, 1] by default, which the kernel (correctly) does not do.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule=kind, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
        **betas,
    )
    scheduler.set_timesteps(50)
    # run diffusers' arithmetic in float64 on the very same ᾱ values, so the comparison can be tight
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    return scheduler


@pytest.mark.parametrize(
    "name,kind,eta",
    [
        ("ddim_linear_eta1", "linear", 1.0),
        ("ddim_linear_eta0.5", "linear", 0.5),
        ("ddim_scaled_eta1", "scaled_linear", 1.0),
    ],
)
def test_ddim_kernel_matches_diffusers_ddim_scheduler(name, kind, eta):
    k = kernel(name)
    scheduler = _ddim_scheduler(kind)
    # the schedule is diffusers' own ᾱ
    torch.testing.assert_close(schedule(kind).alphas_cumprod, scheduler.alphas_cumprod, rtol=0, atol=0)
    expected_timesteps = torch.cat([scheduler.timesteps.long(), torch.zeros(1, dtype=torch.long)])
    assert torch.equal(k.state_timesteps, expected_timesteps)
    assert k.state_timesteps[:3].tolist() == [981, 961, 941] and k.state_timesteps[-2:].tolist() == [1, 0]
    assert k.num_steps == 50

    g = torch.Generator().manual_seed(6)
    x = torch.randn((4, 3), generator=g, dtype=torch.float64)
    eps = torch.randn((4, 3), generator=g, dtype=torch.float64)
    has_get_variance = hasattr(scheduler, "_get_variance")
    for i, t in enumerate(scheduler.timesteps):
        step = torch.full((4,), i, dtype=torch.long)
        ours = k.mean(x, eps, step)
        theirs = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=f"mean at step {i} (t={int(t)})")
        # the noise scale via the public API: x = ε = 0, unit variance noise ⇒ prev_sample = σ
        unit = scheduler.step(torch.zeros(1, 1, dtype=torch.float64), t, torch.zeros(1, 1, dtype=torch.float64),
                              eta=eta, variance_noise=torch.ones(1, 1, dtype=torch.float64)).prev_sample
        torch.testing.assert_close(k.std[i], unit[0, 0], rtol=1e-10, atol=1e-14, msg=f"std at step {i}")
        if has_get_variance:
            prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            torch.testing.assert_close(
                k.std[i], eta * scheduler._get_variance(t, prev_t) ** 0.5, rtol=1e-10, atol=1e-14
            )


def _ddpm_posterior_tables(abar: torch.Tensor, state_timesteps: torch.Tensor):
    """DDPM posterior q(x_prev | x_t, x̂0) written as μ = a x_t + b ε, σ² (an independent derivation)."""
    abar_t, abar_p = abar[state_timesteps[:-1]], abar[state_timesteps[1:]]
    alpha = abar_t / abar_p
    beta = 1 - alpha
    c0 = abar_p.sqrt() * beta / (1 - abar_t)  # coefficient of x̂0
    ct = alpha.sqrt() * (1 - abar_p) / (1 - abar_t)  # coefficient of x_t
    x_coef = c0 / abar_t.sqrt() + ct
    eps_coef = -c0 * (1 - abar_t).sqrt() / abar_t.sqrt()
    std = (beta * (1 - abar_p) / (1 - abar_t)).sqrt()
    return x_coef, eps_coef, std


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_first_order_sde_dpm_solver_equals_ddim_eta_one_on_same_timesteps(kind):
    abar = schedule(kind).alphas_cumprod
    ddim = kernel("ddim_linear_eta1" if kind == "linear" else "ddim_scaled_eta1")
    dpm = kernel("dpm_linear" if kind == "linear" else "dpm_scaled")
    # the reference tables reproduce DDIM(η=1) on DDIM's own timesteps ...
    for ours, ref in zip((ddim.x_coef, ddim.eps_coef, ddim.std), _ddpm_posterior_tables(abar, ddim.state_timesteps)):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    # ... and SDE-DPM-Solver++ (first order) on its timesteps
    assert dpm.state_timesteps[:2].tolist() == [999, 949] and dpm.state_timesteps[-2:].tolist() == [50, 0]
    assert dpm.num_steps == 20
    reference = _ddpm_posterior_tables(abar, dpm.state_timesteps)
    for label, ours, ref in zip(("x_coef", "eps_coef", "std"), (dpm.x_coef, dpm.eps_coef, dpm.std), reference):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12, msg=label)


@pytest.mark.parametrize("name,kind,final_sigmas_type", [
    ("dpm_linear", "linear", "zero"),
    ("dpm_linear", "linear", "sigma_min"),
    ("dpm_scaled", "scaled_linear", "sigma_min"),
])
def test_sde_dpm_solver_kernel_matches_diffusers(name, kind, final_sigmas_type):
    """diffusers' DPMSolverMultistepScheduler(sde-dpmsolver++, order 1) converts ε to x̂0 internally and runs in
    float32 (it casts the sample and its σ table to float32), hence the float32-level tolerance. Its default last
    step goes to σ = 0 while ours goes to ᾱ at t = 0; with final_sigmas_type="sigma_min" diffusers also ends at
    t = 0, so the last step is compared in that case and skipped for "zero"."""
    from diffusers import DPMSolverMultistepScheduler

    k = kernel(name)
    betas = SD_BETAS if kind == "scaled_linear" else {"beta_start": 1e-4, "beta_end": 0.02}
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule=kind, algorithm_type="sde-dpmsolver++", solver_order=1,
        final_sigmas_type=final_sigmas_type, **betas,
    )
    scheduler.set_timesteps(20)
    assert torch.equal(k.state_timesteps[:-1], scheduler.timesteps.long())

    g = torch.Generator().manual_seed(7)
    x = torch.randn((4, 3), generator=g)
    eps = torch.randn((4, 3), generator=g)
    # rows 0–3: the mean (zero noise); row 4: x = ε = 0 with unit noise ⇒ σ
    sample = torch.cat([x, torch.zeros(1, 3)])
    model_output = torch.cat([eps, torch.zeros(1, 3)])
    noise = torch.cat([torch.zeros(4, 3), torch.ones(1, 3)])
    compared = 0
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(model_output=model_output, timestep=t, sample=sample, variance_noise=noise).prev_sample
        if i == k.num_steps - 1 and final_sigmas_type == "zero":
            continue
        step = torch.full((4,), i, dtype=torch.long)
        torch.testing.assert_close(k.mean(x, eps, step), out[:4], rtol=1e-4, atol=2e-5, msg=f"mean at step {i}")
        torch.testing.assert_close(k.std[i].float(), out[4, 0], rtol=1e-4, atol=1e-7, msg=f"std at step {i}")
        compared += 1
    assert compared == (20 if final_sigmas_type == "sigma_min" else 19)


@pytest.mark.parametrize("name", KERNELS)
def test_last_step_std_is_tiny_but_nonzero(name):
    k = kernel(name)
    last = float(k.std[-1])
    assert 0 < last < 0.05
    assert last < float(k.std[:-1].min()) and last < 0.1 * float(k.std.max())
    assert torch.isfinite(k.std).all() and (k.std > 0).all()
    # the last transition keeps a finite log-probability
    step = torch.full((3,), k.num_steps - 1, dtype=torch.long)
    mean = torch.zeros(3, 2, dtype=torch.float64)
    assert torch.isfinite(k.log_prob(mean + 0.01, mean, step)).all()


def test_make_kernel_by_name():
    s = schedule("linear")
    ddpm = make_kernel("ddpm", s, 50)
    assert isinstance(ddpm, DDIMKernel) and ddpm.eta == 1.0
    ddim = make_kernel("ddim", s, 50, eta=0.5)
    assert isinstance(ddim, DDIMKernel) and torch.allclose(ddim.std, 0.5 * ddpm.std)
    assert isinstance(make_kernel("dpm_solver", s, 20), SDEDPMSolverKernel)
    with pytest.raises(ValueError, match="bogus"):
        make_kernel("bogus", s, 50)


def test_kernel_rejects_bad_step_counts():
    s = schedule("linear")
    with pytest.raises(ValueError):
        DDIMKernel(s, 0)
    with pytest.raises(ValueError):
        DDIMKernel(s, 50, eta=-0.1)
    with pytest.raises(ValueError):
        SDEDPMSolverKernel(s, 1000)


def test_ddim_accepts_every_step_count_it_validates():
    """With steps_offset=1, "leading" spacing needs one spare timestep: 999 steps work, 1000 are refused cleanly."""
    s = schedule("linear")
    assert DDIMKernel(s, 999).state_timesteps.max() <= 999
    try:
        k = DDIMKernel(s, 1000)
    except ValueError:
        return  # a clean refusal is fine
    assert k.state_timesteps.max() < s.num_train_timesteps
    assert torch.isfinite(k.std).all() and torch.isfinite(k.x_coef).all()


@pytest.mark.parametrize("name", ["ddim_linear_eta1", "dpm_scaled"])
def test_noising_kernel_density_and_scores(name):
    """P_B(x_k | x_{k+1}) = N(√r x_{k+1}, (1 − r) I), r = ᾱ(t_k)/ᾱ(t_{k+1}): against torch.distributions (up to the
    normalising constant) and autograd."""
    from nablagfn.mdp.noising import NoisingKernel

    k = kernel(name)
    sched = schedule("scaled_linear" if "scaled" in name else "linear")
    noising = NoisingKernel(k)
    gen = torch.Generator().manual_seed(3)
    step = torch.tensor([0, 7, k.num_steps - 1], dtype=torch.long)
    x, x_next = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, 4, generator=gen,
                                                                                     dtype=torch.float64)
    abar = sched.alphas_cumprod
    ratio = abar[k.state_timesteps[step]] / abar[k.state_timesteps[step + 1]]
    assert (ratio < 1).all()
    torch.testing.assert_close(noising.coef(step), ratio.sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(noising.variance(step), 1 - ratio, rtol=1e-10, atol=0)
    check_noising_kernel(noising, x, x_next, step, ratio.sqrt(), 1 - ratio)
