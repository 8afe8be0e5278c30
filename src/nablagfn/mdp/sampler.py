"""The sampler's config: which Gaussian kernel (``mdp.make_kernel``) and how many steps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config_base import StrictConfig


class SamplerConfig(StrictConfig):
    """``ddpm``: DDIM with η (1 = the paper's DDPM, 50 steps); ``dpm_solver``: first-order SDE-DPM-Solver++ (both for
    ε-models); ``flow_sde``: Flow-GRPO's SDE with ``noise_level`` (the default for ``model.parameterization=flow``);
    ``flow_ddpm``: the interpolant's posterior step (memoryless, the flow analogue of DDPM); ``flow_cps``: Flow-GRPO's
    coefficients-preserving variant."""

    kind: Literal["ddpm", "ddim", "dpm_solver", "flow_sde", "flow_ddpm", "flow_cps"] = "ddpm"
    steps: int = Field(50, ge=1, le=1000)
    eta: float = Field(1.0, gt=0, description="DDIM η; > 0, since η = 0 is deterministic and has no log-probs")
    noise_level: float = Field(
        0.7, gt=0, description="flow samplers' a (Flow-GRPO's default 0.7); > 0, since a = 0 is the deterministic ODE"
    )
