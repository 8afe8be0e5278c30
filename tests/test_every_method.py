"""Every `method.name` trains through `nablagfn train` on every backend (Gaussian mixture as an ε-model and as a flow,
digits, tiny Stable Diffusion, tiny FLUX) and writes a complete run directory: metrics with a finite loss, a checkpoint, figures."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SMALL_RUN
from tiny_flux import RESOLUTION, save_tiny_flux
from tiny_sd import save_tiny_sd

from nablagfn.cli import main
from nablagfn.methods import METHODS

COMMON = ["--no-progress", "train.updates=1", "train.log_every=1", "train.checkpoint_every=1"]
BACKENDS = {
    "gmm": [*SMALL_RUN],
    "gmm_flow": [*SMALL_RUN, "model.parameterization=flow"],
    "digits": ["model.kind=digits", "sampler.steps=5", "train.trajectories_per_epoch=4", "train.batch_size=2",
               "train.eval_samples=4"],
    "stable_diffusion": ["model.kind=stable_diffusion", "model.dtype=fp32", "model.flow_channels=[8,16]",
                         "reward.kind=brightness", "sampler.steps=3", "train.trajectories_per_epoch=2",
                         "train.batch_size=2", "train.eval_samples=2"],
    "flux": ["model.kind=flux", "model.dtype=fp32", "model.flow_channels=[8,16]", f"model.resolution={RESOLUTION}",
             "model.max_sequence_length=16", "model.gradient_checkpointing=false", "reward.kind=brightness",
             "sampler.steps=3", "train.trajectories_per_epoch=2", "train.batch_size=2", "train.accumulation=1",
             "train.eval_samples=2"],
}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "pipeline")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(METHODS))
def test_cli_train_every_method_on_every_backend(request, tmp_path, backend, name):
    overrides = [*COMMON, *BACKENDS[backend], f"method.name={name}"]
    if name == "flow_grpo":
        overrides.append("method.group_size=2")  # groups must divide the small epochs
    if backend == "stable_diffusion":
        overrides.append(f"model.path={request.getfixturevalue('pipeline_dir')}")
    if backend == "flux":
        overrides.append(f"model.path={request.getfixturevalue('flux_dir')}")
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), *overrides]) == 0

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert (run_dir / "checkpoints" / "update_0000001" / "model.safetensors").is_file()
    assert (run_dir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(math.isfinite(value) for value in json.loads((run_dir / "eval.json").read_text()).values())
