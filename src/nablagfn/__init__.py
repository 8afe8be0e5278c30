"""nablagfn: reward finetuning of diffusion models with residual ∇-DB (Nabla-GFlowNet) and baselines."""

__version__ = "0.1.0"
