"""Mixed precision and gradient checkpointing on the tiny Stable Diffusion pipeline: bf16 base weights train with
fp32 trainable parameters, reward model and optimiser state; checkpointing recomputes, and changes no gradient."""

from __future__ import annotations

import pytest
import torch
from test_rewards_clip import _save_clip, _save_preprocessor, _save_tokenizer
from tiny_sd import save_tiny_sd

from nablagfn.config_loading import load_config
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP model in the real format, for a reward with weights."""
    directory = tmp_path_factory.mktemp("clip")
    _save_clip(directory, 16, seed=0)
    _save_tokenizer(directory)
    _save_preprocessor(directory)
    return directory


def settings(pipeline_dir, *extra: str) -> list[str]:
    return [
        "model.kind=stable_diffusion",
        f"model.path={pipeline_dir}",
        "model.flow_channels=[8,16]",
        "reward.kind=brightness",
        "sampler.steps=3",
        "method.beta=100",
        "train.trajectories_per_epoch=2",
        "train.batch_size=2",
        "train.updates=1",
        "train.eval_samples=2",
        *extra,
    ]


def trainable(trainer: Trainer) -> list[torch.nn.Parameter]:
    return [p for group in trainer.parameter_groups.values() for p in group]


@pytest.mark.parametrize("method", [
    ["method.name=residual_nabla_db", "model.gradient_checkpointing=true"],
    ["method.name=residual_db", "method.beta_ramp=0", "model.gradient_checkpointing=false"],  # β from the start
])
def test_bf16_base_weights_train_with_fp32_trainables_reward_and_optimizer_state(pipeline_dir, clip_dir, tmp_path,
                                                                                  method):
    config = load_config(None, settings(pipeline_dir, "model.dtype=bf16", "reward.kind=clip",
                                        f"reward.model={clip_dir}", *method))
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)
    run, backend = trainer.run, trainer.run.backend
    assert set(trainer.parameter_groups) == {"policy", "flow"}
    trained = {id(p) for p in trainable(trainer)}
    assert {p.dtype for p in trainable(trainer)} == {torch.float32}
    assert {p.dtype for p in run.method.networks.parameters()} == {torch.float32}  # g_φ (and ScalarFlow's scale)
    assert all(id(p) in trained for p in run.method.networks.parameters())
    for module in (backend.unet, backend.vae, backend.text_encoder):
        frozen = [p for p in module.parameters() if id(p) not in trained]
        assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
        assert not any(p.requires_grad for p in frozen)
    reward_parameters = list(run.reward.parameters())
    assert reward_parameters and {p.dtype for p in reward_parameters} == {torch.float32}

    # one loss on a rollout: finite, with finite fp32 gradients reaching both groups
    generator = torch.Generator().manual_seed(0)
    trajectories = run.rollout(backend.sample_conditions(2, generator), generator)
    assert trajectories.states.dtype == torch.float32
    loss, _ = run.method.trajectory_loss(trajectories, generator)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    for name, group in trainer.parameter_groups.items():
        grads = [p.grad for p in group if p.grad is not None]
        assert grads, name
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    for p in trainable(trainer):
        p.grad = None

    # one training update: every trainable parameter moves, the bf16 base does not, AdamW's state is fp32
    before = {id(p): p.detach().clone() for p in backend.parameters()}
    before.update({id(p): p.detach().clone() for p in trainable(trainer)})
    trainer.train()
    assert all(torch.equal(p, before[id(p)]) for p in backend.parameters() if id(p) not in trained)
    for name, group in trainer.parameter_groups.items():
        assert any(not torch.equal(p, before[id(p)]) for p in group), name
    for optimizer in trainer.optimizers.values():
        states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
        assert all(state for state in states)
        assert {state[key].dtype for state in states for key in ("exp_avg", "exp_avg_sq")} == {torch.float32}


def block_runs(module: torch.nn.Module) -> list[str]:
    """Records the name of each residual and transformer block of ``module`` every time its ``forward`` runs
    (wrapped, since forward hooks do not fire when checkpointing recomputes a block)."""
    calls: list[str] = []
    for name, block in module.named_modules():
        if type(block).__name__ in ("ResnetBlock2D", "BasicTransformerBlock"):
            def counted(*args, _forward=block.forward, _name=name, **kwargs):
                calls.append(_name)
                return _forward(*args, **kwargs)

            block.forward = counted
    return calls


def test_gradient_checkpointing_recomputes_flow_network_and_keeps_every_gradient(pipeline_dir):
    """Residual ∇-DB's whole loss (ε_θ, ε# with its reward look-ahead through the VAE, g_φ) on the same
    trajectories, with and without ``model.gradient_checkpointing``: the same gradients on the LoRA and on g_φ,
    and with it every block of g_φ runs again in the backward pass."""
    gradients, loss_values, flow_calls = [], [], []
    for checkpointing in (False, True):
        run = Run.build(load_config(None, settings(pipeline_dir, "model.dtype=fp32",
                                                   f"model.gradient_checkpointing={checkpointing}")))
        flow = run.method.networks["flow_score"].unet
        perturb = torch.Generator().manual_seed(1)
        with torch.no_grad():  # past the zero start, so every layer of the adapter and of g_φ gets a gradient
            for name, p in run.backend.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1, generator=perturb)
            flow.conv_out.weight.normal_(std=0.1, generator=perturb)
        generator = torch.Generator().manual_seed(0)
        trajectories = run.rollout(run.backend.sample_conditions(2, generator), generator)
        calls = block_runs(flow)
        loss, _ = run.method.trajectory_loss(trajectories, generator)
        forward_calls = len(calls)
        loss.backward()
        flow_calls.append((forward_calls, len(calls) - forward_calls))
        loss_values.append(loss.detach())
        parameters = [*run.backend.trainable_parameters(), *run.method.networks.parameters()]
        gradients.append([p.grad for p in parameters])
    plain, checkpointed = gradients
    assert flow_calls[0][1] == 0 and flow_calls[1][1] > 0  # recomputed in the backward pass only when enabled
    assert flow_calls[0][0] == flow_calls[1][0]
    torch.testing.assert_close(loss_values[1], loss_values[0], rtol=0, atol=0)
    assert sum(g is not None and g.abs().sum() > 0 for g in plain) == len(plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
