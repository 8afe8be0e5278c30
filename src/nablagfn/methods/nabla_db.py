"""∇-DB without a prior (eq. 6–9); target ∝ R(x)^β.

The η = 0 case of residual ∇-DB (``residual_nabla_db.py``): the residual policy log P̃ = log P_F − log P_B
with the backward policy the pretrained noising kernel over the sampler's stride,
P_B(x_k | x_{k+1}) = N(√r x_{k+1}, (1 − r) I), r = ᾱ(t_k)/ᾱ(t_{k+1}), and the same forward-looking flow
score ∇ log F(x_k) = β γ_k ∇ log R(x̂(x_k)) + g_φ(x_k):

  forward (eq. 7):   ‖∇_{x_{k+1}} log P_F − ∇_{x_{k+1}} log P_B − ∇ log F(x_{k+1})‖²
  reverse (eq. 9):   ‖∇_{x_k} log P_F − ∇_{x_k} log P_B + ∇ log F(x_k)‖²
  terminal (eq. 8):  ‖g_φ(x_K)‖²   (∇ log F(x_K) = β ∇ log R(x_K) exactly)

The reverse term is first order (trains g_φ only); ``reverse_target="expected"`` (default) replaces the
sampled x_{k+1} in it by its mean under the policy (closed form: P_B is linear-Gaussian).
"""

from __future__ import annotations

from typing import Literal

from .residual_nabla_db import ResidualNablaDB, _GradientFlowConfig


class NablaDBConfig(_GradientFlowConfig):
    """∇-DB without a prior (eq. 7–9): target ∝ R^β, backward policy = the noising kernel."""

    name: Literal["nabla_db"] = "nabla_db"
    reverse_target: Literal["expected", "sampled"] = "expected"
    # without the prior the targets carry 1/(1 − r) times the policy's error: these weightings keep it stable
    forward_weighting: Literal["eps", "score"] = "score"
    reverse_weighting: Literal["score", "variance"] = "variance"


class NablaDB(ResidualNablaDB):
    """Residual ∇-DB at η = 0, with g_φ detached in the forward loss and a first-order reverse loss."""

    config_class = NablaDBConfig

    prior_strength = 0.0
    detach_flow_in_forward = True
    second_order = False
