"""Your own reward: a plain Python function of images (or states) and prompts, as TRL's trainers take them.

``fn(images, prompts) -> Tensor`` returns log R per sample, shape (B,). ``images`` are what the backend
decodes (images in [0, 1] of shape (B, C, H, W); states (B, d) for the Gaussian mixture), ``prompts`` each
sample's prompt (empty strings where the model has no text). From a config, the function is imported by name:
``reward.kind=python reward.function=package.module:function`` (your own code, imported as any module is: it
must be on ``sys.path``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ..config_base import StrictConfig
from ..errors import ConfigError
from .base import Reward

RewardFunction = Callable[[Tensor, list[str]], Tensor]


class PythonRewardConfig(StrictConfig):
    """A reward written in Python: ``function`` is ``package.module:function``, imported when the run is built."""

    kind: Literal["python"] = "python"
    function: str = Field(
        "", description="package.module:function (or :Class.method) computing log R from (images, prompts)"
    )
    differentiable: bool = Field(
        True, description="whether ∇ log R with respect to the images is meaningful (gradient methods need it)"
    )

    @field_validator("function")
    @classmethod
    def _import_path(cls, value: str) -> str:
        if value and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"reward.function: {value!r} is not of the form package.module:function")
        return value


def import_function(path: str) -> RewardFunction:
    """The object at ``package.module:name`` (dots after the colon walk attributes), or a one-line ConfigError."""
    if not path:
        raise ConfigError("reward.function: reward.kind=python needs the function, as reward.function=package.module:function")
    module_name, attribute = path.split(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward.function: cannot import module {module_name!r} ({error}); is it on sys.path?") from None
    try:
        for name in attribute.split("."):
            target = getattr(target, name)
    except AttributeError:
        raise ConfigError(f"reward.function: module {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise ConfigError(f"reward.function: {path} is not callable")
    return target


def import_path_of(fn: RewardFunction) -> str | None:
    """``module:qualname`` that imports ``fn`` again in another process, or None (a lambda, a local function,
    or one defined in a script run as ``__main__``)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        found = import_function(f"{module}:{qualname}")
    except ConfigError:
        return None
    return f"{module}:{qualname}" if found is fn else None


class CallableReward(Reward):
    """log R from a plain function ``fn(images, prompts) -> Tensor`` of shape (B,).

    Args:
        fn: computes log R per sample from the decoded samples and their prompts.
        differentiable: whether ∇ log R through ``fn`` is meaningful; methods that need reward gradients
            refuse a reward that says it is not, when the trainer is built.
        uses_prompts: whether ``fn`` reads the prompts (a model without text then gives an error, not empty strings).
    """

    config_class = PythonRewardConfig

    def __init__(self, fn: RewardFunction, differentiable: bool = True, uses_prompts: bool = False):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"CallableReward needs a function of (images, prompts), got {type(fn).__name__}")
        self.fn = fn
        self.differentiable = differentiable
        self.uses_prompts = uses_prompts
        path = import_path_of(fn)
        #: the config that rebuilds this reward in another process; None where ``fn`` cannot be imported by name
        self.config = None if path is None else PythonRewardConfig(function=path, differentiable=differentiable)

    @classmethod
    def from_config(cls, config: PythonRewardConfig) -> "CallableReward":
        reward = cls(import_function(config.function), config.differentiable)
        reward.config = config
        return reward

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        prompts = self.prompts_of(cond) if self.prompts or self.uses_prompts else [""] * len(cond)
        values = self.fn(y, prompts)
        if not isinstance(values, Tensor):
            values = torch.as_tensor(values, dtype=torch.float32, device=y.device)
        if values.shape != (len(y),):
            raise ValueError(
                f"reward function {getattr(self.fn, '__qualname__', self.fn)!r} returned shape {tuple(values.shape)}; "
                f"it must return one log R per sample, shape ({len(y)},)"
            )
        return values.float()
