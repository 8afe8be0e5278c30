"""Inverse noise correction on a flow model with a known learning error: the pretrained velocity is the exact one of
a *different* mixture than the data's, so its samples miss the data; inverted data noise maps back onto the data, and
a corrector trained on it brings the samples to the data."""

from __future__ import annotations

import pytest
import torch

from nablagfn.eval.gmm import energy_distance
from nablagfn.mixture import GaussianMixture
from nablagfn.noise_correction import CorrectorTraining, corrected_noise, generate, invert, ode_grid, train_corrector

DATA = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]]), torch.tensor([0.4, 0.3, 0.5]),
                       torch.tensor([0.5, 0.3, 0.2]))
#: the "pretrained model" learned the modes' weights and positions slightly wrong
LEARNED = GaussianMixture(torch.tensor([[-1.7, 0.2], [2.2, 0.2], [0.2, 2.2]]), torch.tensor([0.45, 0.3, 0.4]),
                          torch.tensor([0.3, 0.4, 0.3]))


def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    return LEARNED.velocity(x, timestep.double() / 1000)


def test_inverted_noise_generates_the_data_back():
    grid = ode_grid(100)
    data = DATA.sample(200, torch.Generator().manual_seed(0))
    noise = invert(velocity, data, grid)
    torch.testing.assert_close(generate(velocity, noise, grid), data, atol=1e-4, rtol=0)
    # the inverted noise is not N(0, I): that is what the corrector learns
    assert (noise.mean(0).abs().max() > 0.1) or ((noise.var(0) - 1).abs().max() > 0.1)


def test_corrected_samples_are_closer_to_the_data_than_the_pretrained_ones():
    grid = ode_grid(20)
    data = DATA.sample(2000, torch.Generator().manual_seed(0))
    corrector = train_corrector(invert(velocity, data, ode_grid(100), iterations=4),
                                CorrectorTraining(steps=2000, batch_size=256, lr=2e-3), hidden=64, layers=2)
    generator = torch.Generator().manual_seed(1)
    plain = generate(velocity, torch.randn(2000, 2, generator=generator), grid)
    corrected = generate(velocity, corrected_noise(corrector, 2000, 10, generator), grid)
    reference = DATA.sample(2000, torch.Generator().manual_seed(2))
    before = energy_distance(plain, reference)  # 0.36 at 4,000 samples
    after = energy_distance(corrected, reference)  # 0.045
    assert after < 0.3 * before, (before, after)


def test_minibatch_ot_coupling_keeps_few_step_correctors_straight():
    # inverted noise that is already N(0, I): the corrector should leave it be. Independent pairs give a curved flow
    # whose 5-step Euler ODE shrinks the noise (std 0.77 with the exact velocity); OT pairs give a near-identity one.
    target = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    stds = {}
    for coupling in ("minibatch_ot", "independent"):
        corrector = train_corrector(target, CorrectorTraining(steps=1500, lr=2e-3, ema=0.99, coupling=coupling),
                                    hidden=64, layers=2)
        stds[coupling] = corrected_noise(corrector, 4000, 5, torch.Generator().manual_seed(1)).std().item()
    assert abs(stds["minibatch_ot"] - 1) < 0.05, stds
    assert stds["independent"] < 0.9, stds


def test_corrector_training_refuses_an_unknown_coupling():
    with pytest.raises(ValueError, match="coupling"):
        CorrectorTraining(coupling="sinkhorn")
