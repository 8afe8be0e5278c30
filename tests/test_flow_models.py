"""Flow models wired in: ``model.parameterization=flow`` on the mixture, the sampler kinds each parameterization takes,
the per-method default flow sampler, refusals of inconsistent settings, and the methods' parameterization-free
quantities (clean prediction, ε-prediction, noising kernel, γ) on a flow model."""

from __future__ import annotations

import pytest
import torch

from nablagfn.config import ConfigError
from nablagfn.config_loading import load_config
from nablagfn.mdp import FlowDDPMKernel, FlowParameterization, FlowSDEKernel
from nablagfn.train.run import Run

FLOW = ["model.kind=gmm", "model.parameterization=flow", "sampler.steps=10", "model.hidden=32", "model.layers=2"]


@pytest.mark.parametrize("method,kind", [("residual_nabla_db", "flow_ddpm"), ("nabla_db", "flow_ddpm"),
                                         ("adjoint_matching", "flow_ddpm"), ("flow_grpo", "flow_sde"),
                                         ("ddpo", "flow_sde"), ("draft", "flow_sde")])
def test_default_flow_sampler_per_method(method, kind):
    config = load_config(None, [*FLOW, f"method.name={method}"])
    assert config.sampler.kind == kind
    assert load_config(None, ["model.kind=gmm", f"method.name={method}"]).sampler.kind == "ddpm"


@pytest.mark.parametrize("method", ["residual_nabla_db", "nabla_db"])
def test_flow_models_default_to_a_unit_lookahead_scale(method):
    assert load_config(None, [*FLOW, f"method.name={method}"]).method.gamma == "one"
    assert load_config(None, [*FLOW, f"method.name={method}", "method.gamma=alpha_bar"]).method.gamma == "alpha_bar"
    assert load_config(None, ["model.kind=gmm", f"method.name={method}"]).method.gamma == "sqrt_alpha_bar"


def test_residual_nabla_db_with_the_paper_policy_target_keeps_flow_sde():
    config = load_config(None, [*FLOW, "method.policy_target=detailed_balance"])
    assert config.sampler.kind == "flow_sde"
    assert isinstance(Run.build(config).kernel, FlowSDEKernel)


@pytest.mark.parametrize("overrides,key", [
    ([*FLOW, "sampler.kind=ddpm"], "sampler.kind: ddpm does not sample model.parameterization=flow"),
    (["model.kind=gmm", "sampler.kind=flow_sde"], "sampler.kind: flow_sde does not sample model.parameterization=eps"),
    ([*FLOW, "method.name=digits_nonsense"], "method"),
])
def test_mismatched_sampler_kinds_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides,message", [
    (["sampler.kind=flow_sde"], "method.policy_target: tilted_score needs a memoryless sampler"),
    (["method.name=adjoint_matching", "sampler.kind=flow_sde"], "adjoint_matching needs a memoryless sampler"),
    (["method.name=adjoint_matching", "sampler.kind=flow_cps"], "sampler.kind=flow_ddpm"),
])
def test_methods_that_need_a_memoryless_flow_sampler_refuse_the_others(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Run.build(load_config(None, [*FLOW, *overrides]))


def test_flow_mixture_backend_is_the_exact_velocity_and_starts_at_the_pretrained_model():
    run = Run.build(load_config(None, FLOW))
    backend, kernel = run.backend, run.kernel
    assert isinstance(backend.parameterization, FlowParameterization) and backend.schedule is None
    assert isinstance(kernel, FlowDDPMKernel)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((16,), 600.0)
    expected = backend.mixture.velocity(x, 0.6)
    torch.testing.assert_close(backend.eps(x, t, torch.zeros(16, dtype=torch.long), finetuned=False), expected)
    torch.testing.assert_close(backend.eps(x, t, torch.zeros(16, dtype=torch.long)), expected)  # residual = 0
    assert backend.describe().parameterization == "flow"


def test_parameterization_quantities_of_a_flow_model():
    """x̂₀ = x − σ v and ε̂ = x + (1 − σ) v of the exact velocity are E[x₀ | x_σ] and E[ε | x_σ] (checked against
    Tweedie's formula through the exact score); the noising kernel and γ (``sqrt_alpha_bar``: 1 − σ) come from the
    states' σ."""
    run = Run.build(load_config(None, [*FLOW, "method.gamma=sqrt_alpha_bar"]))
    backend, kernel, method = run.backend, run.kernel, run.method
    parameterization = backend.parameterization
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = 0.4
    t = torch.full((32,), sigma * 1000)
    velocity = backend.mixture.velocity(x, sigma)
    score = backend.mixture.score_at(x, torch.full((32,), 1 - sigma), torch.full((32,), sigma))
    torch.testing.assert_close(parameterization.to_eps(x, t, velocity), -sigma * score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(backend.predict_clean(x, t, velocity), (x + sigma**2 * score) / (1 - sigma), rtol=1e-5,
                               atol=1e-6)
    step = torch.arange(kernel.num_steps)
    sigmas = kernel.state_sigmas
    torch.testing.assert_close(method.noising.coef(step), (1 - sigmas[:-1]) / (1 - sigmas[1:]))
    torch.testing.assert_close(method.gamma(step), (1 - sigmas[:-1]).clamp(max=1.0))
    assert float(method.gamma(torch.tensor([kernel.num_steps]))) == 1.0
