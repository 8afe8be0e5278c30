"""Checkpoints: safetensors for every tensor, JSON for the rest, written atomically.

Layout of ``RUN_DIR/checkpoints/update_000500/``:
  model.safetensors         the policy adapter (``policy.*``) and the method's networks (``method.*``)
  optimizers.safetensors    every optimiser's state tensors
  state.safetensors         RNG state and the trajectories carried to the next epoch
  state.json                counters, optimiser hyper-parameters, epoch position
A checkpoint directory is first written under a temporary name and then renamed,
so a crash while saving leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = name + "."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("update_"))


def save_checkpoint(
    run_dir: Path,
    update: int,
    modules: dict[str, nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    tensors: dict[str, torch.Tensor],
    state: dict,
    keep: int,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"update_{update:07d}"
    staging = root / f".tmp_update_{update:07d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model = {}
    for prefix, module in modules.items():
        items = module.state_dict() if isinstance(module, nn.Module) else module
        model.update({f"{prefix}.{k}": v.detach().contiguous() for k, v in items.items()})
    save_file(model, staging / "model.safetensors")
    optimizer_tensors, optimizer_meta = {}, {}
    for name, optimizer in optimizers.items():
        t, meta = _optimizer_tensors(name, optimizer)
        optimizer_tensors.update(t)
        optimizer_meta[name] = meta
    save_file(optimizer_tensors, staging / "optimizers.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "state.safetensors")
    (staging / "state.json").write_text(json.dumps({**state, "optimizers": optimizer_meta}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no model.safetensors (incomplete or not a checkpoint)")
    return load_file(path)


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def load_training_state(checkpoint: Path, optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict, dict]:
    """Restore the optimisers in place; return (state.json contents, state tensors)."""
    checkpoint = Path(checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    optimizer_tensors = load_file(checkpoint / "optimizers.safetensors")
    for name, optimizer in optimizers.items():
        _restore_optimizer(name, optimizer, optimizer_tensors, state["optimizers"][name])
    return state, load_file(checkpoint / "state.safetensors")
