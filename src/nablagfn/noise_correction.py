"""Inverse noise correction (seed 003, "Fine-tuning diffusion models via intermediate distribution shaping"): a
reward-free improvement of a pretrained flow model.

A flow model's probability-flow ODE dx = v(x, σ) dσ, from σ = 1 to σ = 0, maps noise to samples. With learning
errors the image of z ~ N(0, I) misses the data. Run backwards from real data, the same ODE gives the noises that land
on the data — the *inverted noise*, whose law is not N(0, I). Inverse noise correction learns that law with a second,
small rectified flow (the *corrector*, from N(0, I) at σ = 1 to the inverted noise at σ = 0) and samples

    z ~ N(0, I)  →  corrector ODE (K_c steps)  →  z̃  →  pretrained ODE (K steps)  →  x.

``invert`` runs the Euler ODE of a fine grid backwards, each step x_k = x_{k+1} − v(x_k, t_k)·dt_k solved by
fixed-point iteration, so the same fine ODE maps the inverted noise back onto the data (tested); sampling with fewer
steps K adds the pretrained ODE's own discretisation error, which the correction does not remove. The corrector models
a distribution close to a Gaussian, so it is small and takes few steps; the cost per image is K_c corrector calls +
K pretrained calls (``function_evaluations``).

Few corrector steps need straight paths. Trained on independent pairs (z, z̃), the corrector's flow is curved even
when the inverted noise is exactly N(0, I) (then v(x, σ) = (2σ − 1)/((1 − σ)² + σ²)·x, not 0), and its 5-step Euler
ODE shrinks the noise to std 0.77. The default ``coupling="minibatch_ot"`` pairs each batch's noises and targets by
the optimal assignment of squared distances (minibatch OT flow matching: Tong et al. 2023; Pooladian et al. 2023),
which makes the flow close to the identity where the inverted noise is close to N(0, I).

The σ grids are diffusers' (``mdp.flow.FlowSDEKernel`` with noise level 0, the Euler ODE).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .backends.nets import TimeConditionedMLP
from .mdp.flow import FlowSDEKernel

#: (x, model time t (B,)) → velocity, the model being corrected (its adapter off)
VelocityFn = Callable[[Tensor, Tensor], Tensor]


def ode_grid(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> FlowSDEKernel:
    """The K-step Euler ODE's grid (a Flow-SDE kernel with noise level 0: x_coef 1, velocity coefficient dt)."""
    return FlowSDEKernel(steps, noise_level=0.0, shift=shift, num_train_timesteps=num_train_timesteps)


@torch.no_grad()
def generate(velocity: VelocityFn, noise: Tensor, grid: FlowSDEKernel) -> Tensor:
    """The pretrained ODE from ``noise`` (σ = 1) to samples (σ = 0)."""
    x = noise
    for k in range(grid.num_steps):
        t = grid.state_timesteps[k].expand(x.shape[0]).to(x.device)
        x = x + velocity(x, t) * float(grid.sigma_next[k] - grid.sigma[k])
    return x


@torch.no_grad()
def invert(velocity: VelocityFn, data: Tensor, grid: FlowSDEKernel, iterations: int = 8) -> Tensor:
    """The noise that ``generate`` on the same ``grid`` maps onto ``data``: each step x_k = x_{k+1} − v(x_k, t_k)·dt_k
    solved by ``iterations`` fixed-point iterations from x_{k+1}. They converge when |dt|·Lip(v) < 1, so the grid
    must be fine (a few hundred steps) where the velocity changes fast near the data."""
    x = data
    for k in reversed(range(grid.num_steps)):
        t = grid.state_timesteps[k].expand(x.shape[0]).to(x.device)
        dt = float(grid.sigma_next[k] - grid.sigma[k])
        guess = x
        for _ in range(iterations):
            guess = x - velocity(guess, t) * dt
        x = guess
    return x


class NoiseCorrector(nn.Module):
    """The corrector's velocity network over flattened states (its output layer starts at zero)."""

    def __init__(self, shape: tuple[int, ...], hidden: int = 256, layers: int = 3):
        super().__init__()
        self.shape = tuple(shape)
        self.net = TimeConditionedMLP(math.prod(shape), hidden, layers)

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        return self.net(x.flatten(1), timestep).reshape(x.shape)


@dataclass
class CorrectorTraining:
    """The corrector's training: AdamW ``steps`` × ``batch_size``, EMA of the weights, seeded; ``coupling``: how each
    batch pairs noises with inverted noises (``minibatch_ot``: the assignment minimising the squared distances;
    ``independent``: at random)."""

    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    ema: float = 0.999
    seed: int = 0
    coupling: Literal["minibatch_ot", "independent"] = "minibatch_ot"

    def __post_init__(self):
        if self.coupling not in ("minibatch_ot", "independent"):
            raise ValueError(f"coupling must be 'minibatch_ot' or 'independent', got {self.coupling!r}")


def ot_pairing(noise: Tensor, target: Tensor) -> Tensor:
    """``noise`` reordered so that row i is paired with ``target[i]`` by the assignment minimising Σ‖noise − target‖²
    over the batch (scipy's ``linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(target.flatten(1).double(), noise.flatten(1).double()).pow(2)
    _, columns = linear_sum_assignment(cost.numpy())
    return noise[torch.as_tensor(columns)]


def train_corrector(
    inverted: Tensor, settings: CorrectorTraining | None = None, hidden: int = 256, layers: int = 3,
    progress: bool = False,
) -> NoiseCorrector:
    """A rectified flow from N(0, I) (σ = 1) to the inverted noises (σ = 0): ‖c(x_σ, 1000σ) − (ε − z̃)‖² with σ
    uniform and x_σ = (1 − σ) z̃ + σ ε; returns its EMA weights."""
    settings = settings or CorrectorTraining()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    corrector = NoiseCorrector(tuple(inverted.shape[1:]), hidden, layers)
    averaged = copy.deepcopy(corrector).requires_grad_(False)
    optimizer = torch.optim.AdamW(corrector.parameters(), lr=settings.lr, weight_decay=0.0)
    bar = tqdm(range(settings.steps), desc="noise corrector", disable=not progress, mininterval=1.0)
    for _ in bar:
        target = inverted[torch.randint(0, len(inverted), (settings.batch_size,), generator=generator)]
        noise = torch.randn(target.shape, generator=generator)
        if settings.coupling == "minibatch_ot":
            noise = ot_pairing(noise, target)
        sigma = torch.rand(settings.batch_size, generator=generator)
        sigma_b = sigma.reshape(-1, *([1] * (target.dim() - 1)))
        noisy = (1 - sigma_b) * target + sigma_b * noise
        loss = (corrector(noisy, sigma * 1000) - (noise - target)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for average, current in zip(averaged.parameters(), corrector.parameters()):
                average.lerp_(current, 1 - settings.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return averaged


@torch.no_grad()
def corrected_noise(corrector: NoiseCorrector, num: int, steps: int, generator: torch.Generator) -> Tensor:
    """z ~ N(0, I) carried by the corrector's ``steps``-step Euler ODE to (approximately) the inverted noise."""
    noise = torch.randn((num, *corrector.shape), generator=generator)
    return generate(corrector, noise, ode_grid(steps))


def function_evaluations(pretrained_steps: int, corrector_steps: int = 0, corrector_cost: float = 0.0) -> float:
    """Model evaluations per image in units of the pretrained model's: K + K_c · (corrector cost / model cost)."""
    return pretrained_steps + corrector_steps * corrector_cost
