"""The diffusion sampler as an MDP: schedules, Gaussian transition kernels, rollouts.

Time convention (the paper's): a trajectory is x_0 (noise) → … → x_K (sample);
step i goes from state i to state i + 1. Diffusion timesteps t decrease along it.
"""

from .ddim import DDIMKernel
from .dpm_solver import SDEDPMSolverKernel
from .flow import FlowCPSKernel, FlowMatchKernel, FlowNoisingKernel, FlowSDEKernel
from .gaussian import GaussianKernel
from .rollout import Trajectories, rollout
from .schedules import NoiseSchedule


def make_kernel(kind: str, schedule: NoiseSchedule, steps: int, eta: float = 1.0) -> GaussianKernel:
    """Kernel by name: ``ddpm`` (DDIM with η, 1 by default), ``ddim`` (same) or ``dpm_solver``."""
    if kind in ("ddpm", "ddim"):
        return DDIMKernel(schedule, steps, eta)
    if kind == "dpm_solver":
        return SDEDPMSolverKernel(schedule, steps)
    raise ValueError(f"unknown sampler.kind {kind!r}; choose ddpm, ddim or dpm_solver")


__all__ = [
    "DDIMKernel",
    "FlowCPSKernel",
    "FlowMatchKernel",
    "FlowNoisingKernel",
    "FlowSDEKernel",
    "GaussianKernel",
    "NoiseSchedule",
    "SDEDPMSolverKernel",
    "Trajectories",
    "make_kernel",
    "rollout",
]
