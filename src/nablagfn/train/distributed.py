"""The training processes: one, or several under ``accelerate launch`` (or ``torchrun``), through accelerate.

Every process holds the same networks and optimisers and samples its own shards of each epoch; after each
backward pass the gradients are averaged across processes (one all-reduce of a flat buffer), so every process
takes the same optimiser step. Every process calls every collective, in the same order: there is no
``if main: ...`` around anything that communicates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from ..errors import ConfigError


def check_device(device: str) -> None:
    """A one-line ConfigError naming ``train.device`` when this machine does not have that device."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {device} asked for, but this torch sees no CUDA GPU "
                          f"(torch {torch.__version__}); set train.device=cpu or install a CUDA build of torch")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"train.device: {device} asked for, but only {torch.cuda.device_count()} GPU(s) are "
                          "visible")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: mps asked for, but this torch has no MPS backend; set train.device=cpu")


class Processes:
    """This process's rank among ``world_size`` training processes, its device, and the collectives of training."""

    def __init__(self, device: str = "cpu"):
        check_device(device)
        self.state = PartialState(cpu=device == "cpu")
        self.rank = self.state.process_index
        self.world_size = self.state.num_processes
        self.is_main = self.state.is_main_process
        # one process: the configured device as it is (e.g. cuda:1); several: each its own accelerator
        self.device = str(self.state.device) if self.world_size > 1 and device != "cpu" else device

    def mean_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average ``.grad`` over processes in place. A missing gradient counts as zeros in the mean; a parameter
        without a gradient on every process keeps none, so the optimiser skips it as it would in one process."""
        if self.world_size == 1:
            return
        params = [p for p in params if p.requires_grad]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        flat = reduce(torch.cat([*grads, has_grad]), reduction="mean")
        offset = 0
        for p, used in zip(params, flat[-len(params) :].tolist()):
            size = p.numel()
            p.grad = flat[offset : offset + size].view_as(p).clone() if used > 0 else None
            offset += size

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over processes of scalars that every process holds under the same keys."""
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.state.device)
        tensor = reduce(tensor, reduction="mean")
        return dict(zip(keys, tensor.tolist()))

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([0.0 if flag else 1.0], device=self.state.device)
        return reduce(tensor, reduction="sum").item() == 0.0

    def barrier(self) -> None:
        self.state.wait_for_everyone()
