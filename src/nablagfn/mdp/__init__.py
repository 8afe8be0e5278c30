"""The diffusion sampler as an MDP: schedules, Gaussian transition kernels, rollouts.

Time convention (the paper's): a trajectory is x_0 (noise) → … → x_K (sample);
step i goes from state i to state i + 1. Diffusion timesteps t decrease along it.
"""

from .ddim import DDIMKernel
from .dpm_solver import SDEDPMSolverKernel
from .flow import FlowCPSKernel, FlowDDPMKernel, FlowMatchKernel, FlowSDEKernel
from .gaussian import GaussianKernel
from .noising import NoisingKernel
from .parameterization import EpsilonParameterization, FlowParameterization, Parameterization
from .rollout import Trajectories, rollout
from .schedules import NoiseSchedule

#: sampler kinds by the model parameterization they sample
KERNEL_KINDS = {"eps": ("ddpm", "ddim", "dpm_solver"), "flow": ("flow_sde", "flow_ddpm", "flow_cps")}


def make_kernel(
    kind: str, parameterization: Parameterization | NoiseSchedule, steps: int, eta: float = 1.0,
    noise_level: float = 0.7,
) -> GaussianKernel:
    """Kernel by name for a model of ``parameterization`` (a schedule means ε-prediction under it): ``ddpm`` (DDIM
    with η, 1 by default), ``ddim`` (same) or ``dpm_solver`` for ε-models; ``flow_sde`` or ``flow_cps`` (with
    ``noise_level``, and the model's shift or dynamic-shift μ) for flow models."""
    if isinstance(parameterization, NoiseSchedule):
        parameterization = EpsilonParameterization(parameterization)
    model_kind = parameterization.kind
    if kind not in sum(KERNEL_KINDS.values(), ()):
        raise ValueError(f"unknown sampler.kind {kind!r}; choose one of {', '.join(KERNEL_KINDS[model_kind])}")
    if kind not in KERNEL_KINDS[model_kind]:
        what = {"eps": "an ε-prediction model", "flow": "a flow (velocity) model"}
        raise ValueError(
            f"sampler.kind: {kind} does not sample {what[model_kind]} (model.parameterization={model_kind}); "
            f"choose one of {', '.join(KERNEL_KINDS[model_kind])}"
        )
    if kind in ("ddpm", "ddim"):
        return DDIMKernel(parameterization.schedule, steps, eta)
    if kind == "dpm_solver":
        return SDEDPMSolverKernel(parameterization.schedule, steps)
    if kind == "flow_ddpm":
        return FlowDDPMKernel(steps, parameterization.shift, parameterization.num_train_timesteps, parameterization.mu)
    flow_kernel = FlowSDEKernel if kind == "flow_sde" else FlowCPSKernel
    return flow_kernel(steps, noise_level, parameterization.shift, parameterization.num_train_timesteps,
                       parameterization.mu)


__all__ = [
    "DDIMKernel",
    "FlowCPSKernel",
    "FlowDDPMKernel",
    "FlowMatchKernel",
    "EpsilonParameterization",
    "FlowParameterization",
    "FlowSDEKernel",
    "GaussianKernel",
    "KERNEL_KINDS",
    "NoiseSchedule",
    "NoisingKernel",
    "Parameterization",
    "SDEDPMSolverKernel",
    "Trajectories",
    "make_kernel",
    "rollout",
]
