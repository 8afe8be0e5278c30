"""The built-in digits rectified flow (``model.kind=digits model.parameterization=flow``): shipped velocity weights,
the config key, its sampler, pretraining, and a short finetuning run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nablagfn.backends import build_backend
from nablagfn.backends.digits import DigitsBackend, DigitsModelConfig, DigitsUNet, load_digits_dataset
from nablagfn.cli import main
from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.mdp import KERNEL_KINDS
from nablagfn.mdp.parameterization import FlowParameterization
from nablagfn.pretrain import pretrain_digits_flow
from nablagfn.shipped import shipped_weights
from nablagfn.train.run import Run, load_run

FLOW = ["model.kind=digits", "model.parameterization=flow"]


@pytest.fixture(scope="module")
def backend() -> DigitsBackend:
    torch.manual_seed(0)
    return DigitsBackend.pretrained(parameterization="flow")


def test_flow_backend_is_a_velocity_model_on_the_shipped_weights(backend):
    assert isinstance(backend.parameterization, FlowParameterization) and backend.schedule is None
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10.5, 250.0, 500.25, 999.0])
    cond = torch.zeros(4, dtype=torch.long)
    shipped = DigitsUNet()
    shipped.load_state_dict(load_file(str(shipped_weights("digits_flow_unet.safetensors"))))
    torch.testing.assert_close(backend.eps(x, t, cond, finetuned=False), shipped(x, t))
    torch.testing.assert_close(backend.eps(x, t, cond), backend.eps(x, t, cond, finetuned=False))  # LoRA starts at 0
    assert backend.trainable_parameters() and all("lora_" in name for name in backend.adapter_state_dict())


@pytest.mark.parametrize("sigma", [0.2, 0.5, 0.8])
def test_output_is_the_velocity_of_a_noised_real_digit(backend, sigma):
    """At model time 1000·σ the one-step clean prediction x − σ v of a noised real digit is much closer to it than the
    noisy input, and v points along ε − x₀."""
    images, _ = load_digits_dataset()
    clean = images[::30] * 2 - 1
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    timestep = torch.full((len(clean),), 1000 * sigma)
    noisy = (1 - sigma) * clean + sigma * noise
    with torch.no_grad():
        velocity = backend.eps(noisy, timestep, torch.zeros(len(clean), dtype=torch.long), finetuned=False)
    predicted = backend.predict_clean(noisy, timestep, velocity)
    torch.testing.assert_close(predicted, noisy - sigma * velocity)
    assert (predicted - clean).pow(2).mean() < 0.5 * (noisy - clean).pow(2).mean()
    cosine = torch.nn.functional.cosine_similarity(velocity.flatten(1), (noise - clean).flatten(1)).mean()
    assert cosine > 0.8, cosine


def test_config_key_defaults_its_sampler_and_round_trips(backend):
    config = load_config(None, FLOW)
    assert config.model.parameterization == "flow" and config.sampler.kind in KERNEL_KINDS["flow"]
    assert load_config(None, ["model.kind=digits"]).model.parameterization == "eps"
    assert backend.describe() == DigitsModelConfig(parameterization="flow")
    rebuilt = build_backend(backend.describe())
    assert isinstance(rebuilt.parameterization, FlowParameterization)
    assert DigitsBackend.pretrained().describe().parameterization == "eps"


def test_ddpm_sampler_is_refused_for_the_flow_model():
    with pytest.raises(ConfigError, match=r"sampler\.kind: ddpm does not sample model\.parameterization=flow"):
        load_config(None, [*FLOW, "sampler.kind=ddpm"])
    with pytest.raises(ConfigError, match=r"sampler\.kind: flow_sde does not sample model\.parameterization=eps"):
        load_config(None, ["model.kind=digits", "sampler.kind=flow_sde"])


def test_missing_flow_weights_name_the_key_and_the_command(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.weights.*gone\.safetensors.*pretrain digits-flow"):
        Run.build(load_config(None, [*FLOW, f"model.weights={tmp_path / 'gone.safetensors'}"]))


def test_pretraining_is_seeded_and_loads_as_flow_weights(tmp_path, capsys):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pretrain_digits_flow(first, steps=3, progress=False)  # what the command runs
    assert main(["pretrain", "digits-flow", "--steps", "3", "--out", str(second), "--no-progress"]) == 0
    assert "model.parameterization=flow model.weights=" in capsys.readouterr().out
    assert first.read_bytes() == second.read_bytes()  # byte for byte, as the shipped file is rebuilt
    a = load_file(str(first))
    run = Run.build(load_config(None, [*FLOW, f"model.weights={first}"]))
    assert torch.equal(run.backend.unet.conv_in.base_layer.weight, a["conv_in.weight"])


def test_two_update_residual_nabla_db_run_checkpoints_and_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*FLOW, "method.name=residual_nabla_db", "sampler.steps=5", "train.updates=2",
                 "train.trajectories_per_epoch=4", "train.batch_size=2", "train.eval_samples=8", "train.eval_every=2",
                 "train.checkpoint_every=2"]
    assert main(["train", "--out", str(run_dir), "--no-progress", *overrides]) == 0
    config = load_config(run_dir / "config.yaml")
    assert config.model.parameterization == "flow" and config.sampler.kind in KERNEL_KINDS["flow"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["update_0000002"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "eval/class_accuracy" in r] == [0, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert {"class_accuracy", "fd_to_class", "diversity"} <= evaluation.keys()
    assert load_run(run_dir).backend.parameterization.kind == "flow"  # `nablagfn sample|eval RUN_DIR` rebuild it
