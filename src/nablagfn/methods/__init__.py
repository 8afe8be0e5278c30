"""Finetuning methods: each a loss module over transition batches, behind ``method.name``."""

from .base import Method, TransitionBatch, make_transitions, subsample_steps
from .nabla_db import NablaDB
from .residual_nabla_db import ResidualNablaDB

METHODS: dict[str, type[Method]] = {"residual_nabla_db": ResidualNablaDB, "nabla_db": NablaDB}


def build_method(config, backend, reward, kernel) -> Method:
    return METHODS[config.name](config, backend, reward, kernel)


__all__ = ["METHODS", "Method", "TransitionBatch", "build_method", "make_transitions", "subsample_steps"]
