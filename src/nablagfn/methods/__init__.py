"""Finetuning methods: each a loss module over recorded trajectories, behind ``method.name``.

Modules are imported only when their method is used.
"""

from __future__ import annotations

from importlib import import_module

from .base import Method, TransitionBatch, make_transitions, subsample_steps

#: method.name → "module:Class" (classes take (config, backend, reward, kernel))
METHODS: dict[str, str] = {
    "residual_nabla_db": "residual_nabla_db:ResidualNablaDB",
    "nabla_db": "nabla_db:NablaDB",
    "residual_db": "detailed_balance:ResidualDB",
    "dag_db": "detailed_balance:DAGDB",
    "ddpo": "ddpo:DDPO",
    "flow_grpo": "flow_grpo:FlowGRPO",
    "refl": "backprop:ReFL",
    "draft": "backprop:DRaFT",
    "draft_lv": "backprop:DRaFTLV",
    "alignprop": "backprop:AlignProp",
    "graft": "graft:GRAFT",
    "pgraft": "graft:PGRAFT",
    "adjoint_matching": "adjoint_matching:AdjointMatching",
}


def method_class(name: str) -> type[Method]:
    module_name, class_name = METHODS[name].split(":")
    return getattr(import_module(f".{module_name}", __name__), class_name)


def build_method(config, backend, reward, kernel) -> Method:
    return method_class(config.name)(config, backend, reward, kernel)


__all__ = ["METHODS", "Method", "TransitionBatch", "build_method", "make_transitions", "method_class", "subsample_steps"]
