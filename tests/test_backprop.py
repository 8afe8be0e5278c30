"""ReFL, DRaFT-K, DRaFT-LV, AlignProp: gradient only through the intended steps (against manual computations
from a rollout with the same noise, and by counting model calls), stop/truncation ranges, shaping, refusal of
non-differentiable rewards, short GMM runs that raise the reward, and training steps on tiny SD and digits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_sd import save_tiny_sd

from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.mdp import rollout
from nablagfn.methods import build_method
from nablagfn.methods.backprop import AlignProp, DRaFT, DRaFTLV, ReFL, draw_int
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer

FAST = ["model.kind=gmm", "sampler.steps=10", "model.hidden=32", "model.layers=2"]
METHODS = ["refl", "draft", "draft_lv", "alignprop"]
BATCH = 6


def build_run(*overrides: str, perturb: bool = True) -> Run:
    """A GMM run whose finetuning residual is perturbed away from zero, so every layer gets gradient."""
    run = Run.build(load_config(None, [*FAST, *overrides]))
    if perturb:
        with torch.no_grad():
            for parameter in run.backend.trainable_parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    return run


def cond_of(run: Run) -> torch.Tensor:
    return run.backend.sample_conditions(BATCH, torch.Generator().manual_seed(0))


def method_loss(run: Run, seed: int) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """The method's loss on fresh chains from ``seed``, and its gradient on the policy."""
    parameters = run.backend.trainable_parameters()
    for parameter in parameters:
        parameter.grad = None
    loss, metrics = run.method.chain_loss(cond_of(run), torch.Generator().manual_seed(seed))
    loss.backward()
    return loss, metrics, [parameter.grad.clone() for parameter in parameters]


def manual_gradient(run: Run, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, run.backend.trainable_parameters()))


def assert_same_gradients(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert any(g.abs().sum() > 0 for g in a)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def last_step(run: Run, x: torch.Tensor, cond: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_θ(x) with gradient, step tensor) of kernel step ``index``."""
    step = torch.full((x.shape[0],), index, dtype=torch.long)
    eps = run.backend.eps(x, run.kernel.timestep_of_state(step), cond, finetuned=True)
    return run.kernel.mean(x, eps, step), step


class EpsCalls:
    """Records (timestep, batch, whether the output carries gradient) of every ε call of the finetuned model."""

    def __init__(self, backend, monkeypatch):
        self.calls: list[tuple[int, int, bool]] = []
        original = backend.eps

        def eps(x, timestep, cond, finetuned=True):
            out = original(x, timestep, cond, finetuned)
            self.calls.append((int(timestep[0]), x.shape[0], out.requires_grad))
            return out

        monkeypatch.setattr(backend, "eps", eps)

    def with_gradient(self) -> list[tuple[int, int]]:
        return [(t, batch) for t, batch, grad in self.calls if grad]


# -- the shared sampler ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_chains_use_the_rollout_noise_and_only_the_minibatch_conditions(name):
    run = build_run(f"method.name={name}")
    cond = cond_of(run)
    with torch.no_grad():
        chain = run.method.sample_chain(cond, torch.Generator().manual_seed(3))
    trajectories = rollout(run.backend, run.kernel, cond, torch.Generator().manual_seed(3))
    torch.testing.assert_close(chain, trajectories.final)
    # trajectory_loss reads only the conditions of the recorded minibatch
    loss, _ = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(5))
    expected, _ = run.method.chain_loss(cond, torch.Generator().manual_seed(5))
    assert loss.item() == expected.item()


@pytest.mark.parametrize("name", METHODS)
def test_non_differentiable_rewards_are_refused(name):
    # refused when the config is validated, before any model is built
    with pytest.raises(ConfigError, match=f"method.name: {name} needs reward gradients"):
        load_config(None, ["model.kind=digits", "reward.kind=jpeg_compressibility", f"method.name={name}"])


@pytest.mark.parametrize("shaping,expected", [("none", [1.0, -0.5, -3.0]), ("hinge", [1.0, 1.5, 0.0]),
                                              ("relu", [0.0, -0.5, -3.0])])
def test_reward_shaping(shaping, expected):
    run = build_run("method.name=draft", f"method.shaping={shaping}", "method.reward_weight=2", "method.hinge_margin=1")
    log_reward = torch.tensor([-1.0, 0.5, 3.0])
    loss, metrics = run.method.objective(log_reward)
    assert loss.item() == pytest.approx(2 * sum(expected) / 3)
    assert metrics["loss/log_reward_mean"] == pytest.approx(2.5 / 3)


# -- DRaFT-K ---------------------------------------------------------------------------------------------------------
def test_draft1_gradient_is_that_of_the_last_step_from_a_detached_state():
    run = build_run("method.name=draft")
    loss, _, grads = method_loss(run, seed=11)
    # the same chain by the package's sampler: x_{K−1} detached, then the last step with gradient and its noise
    cond, K = cond_of(run), run.kernel.num_steps
    trajectories = rollout(run.backend, run.kernel, cond, torch.Generator().manual_seed(11))
    mean, _ = last_step(run, trajectories.states[:, K - 1], cond, K - 1)
    final = mean + (trajectories.final - mean.detach())
    manual = -run.reward.log_reward(run.backend.decode(final), cond).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert_same_gradients(grads, manual_gradient(run, manual))


@pytest.mark.parametrize("checkpoint_steps", [False, True])
def test_draft_k_calls_the_model_with_gradient_in_the_last_k_steps_only(monkeypatch, checkpoint_steps):
    run = build_run("method.name=draft", "method.backprop_steps=3", f"method.checkpoint_steps={checkpoint_steps}")
    calls = EpsCalls(run.backend, monkeypatch)
    method_loss(run, seed=0)
    timesteps = run.kernel.state_timesteps.tolist()
    assert [t for t, _, _ in calls.calls[:10]] == timesteps[:10]  # the chain, in order
    last_three = [(t, BATCH) for t in timesteps[7:10]]
    # with checkpointing the steps run again in the backward pass, in reverse order
    assert calls.with_gradient() == (last_three + last_three[::-1] if checkpoint_steps else last_three)


def test_step_checkpointing_does_not_change_gradients():
    plain = method_loss(build_run("method.name=draft", "method.backprop_steps=4"), seed=2)
    checkpointed = method_loss(build_run("method.name=draft", "method.backprop_steps=4",
                                         "method.checkpoint_steps=true"), seed=2)
    assert plain[0].item() == checkpointed[0].item()
    assert_same_gradients(plain[2], checkpointed[2])


def test_draft_refuses_more_steps_than_the_sampler_has():
    with pytest.raises(ConfigError, match="method.backprop_steps: 11 is more than the sampler's 10 steps"):
        build_run("method.name=draft", "method.backprop_steps=11", perturb=False)


# -- DRaFT-LV --------------------------------------------------------------------------------------------------------
def test_draft_lv_gradient_is_the_mean_over_renoised_copies_of_the_detached_sample():
    run = build_run("method.name=draft_lv", "method.copies=3")
    loss, _, grads = method_loss(run, seed=4)
    cond, K, n = cond_of(run), run.kernel.num_steps, 3
    generator = torch.Generator().manual_seed(4)
    final = rollout(run.backend, run.kernel, cond, generator).final  # no gradient anywhere in the chain
    abar = run.backend.schedule.alphas_cumprod
    ratio = abar[run.kernel.state_timesteps[K - 1]] / abar[0]  # the last step's ᾱ over the sample's (t = 0)
    renoised = ratio.sqrt().float() * final.repeat(n, 1) + (1 - ratio).sqrt().float() * torch.randn(
        (n * BATCH, 2), generator=generator)
    mean, step = last_step(run, renoised, cond.repeat(n), K - 1)
    denoised = mean + run.kernel.std_like(mean, step) * torch.randn((n * BATCH, 2), generator=generator)
    manual = -run.reward.log_reward(denoised, cond.repeat(n)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert_same_gradients(grads, manual_gradient(run, manual))


@pytest.mark.parametrize("include_sampled_step", [False, True])
def test_draft_lv_model_calls(monkeypatch, include_sampled_step):
    run = build_run("method.name=draft_lv", f"method.include_sampled_step={include_sampled_step}")
    calls = EpsCalls(run.backend, monkeypatch)
    method_loss(run, seed=0)
    last = run.kernel.state_timesteps[-2].item()
    assert len(calls.calls) == 11  # the chain, then the 2 copies in one batch
    assert calls.with_gradient() == [(last, BATCH)] * include_sampled_step + [(last, 2 * BATCH)]


# -- ReFL ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,fractions,expected", [(50, (0.7, 1.0), (35, 49)), (40, (0.75, 1.0), (30, 39)),
                                                      (10, (0.7, 1.0), (7, 9)), (3, (0.7, 1.0), (2, 2)),
                                                      (1, (0.7, 1.0), (0, 0)), (10, (0.0, 0.3), (0, 2))])
def test_refl_stop_range(steps, fractions, expected):
    run = build_run("method.name=refl", f"sampler.steps={steps}", f"method.stop_range={list(fractions)}",
                    perturb=False)
    assert run.method.stop_range() == expected
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_int(*expected, generator) for _ in range(3000)])
    counts = torch.bincount(draws - expected[0], minlength=expected[1] - expected[0] + 1)
    assert draws.min() == expected[0] and draws.max() == expected[1]
    assert (counts.double() / 3000 - 1 / counts.numel()).abs().max() < 0.03


def test_refl_stop_range_is_validated():
    with pytest.raises(ConfigError, match=r"method.stop_range: need 0 ≤ low ≤ high ≤ 1"):
        load_config(None, [*FAST, "method.name=refl", "method.stop_range=[0.9,0.5]"])


def test_refl_gradient_is_that_of_the_clean_prediction_at_the_detached_stop_state():
    run = build_run("method.name=refl", "method.stop_range=[0.0,1.0]")
    loss, metrics, grads = method_loss(run, seed=9)
    cond = cond_of(run)
    generator = torch.Generator().manual_seed(9)
    stop = draw_int(*run.method.stop_range(), generator)
    assert metrics["refl/stop_state"] == stop
    state = rollout(run.backend, run.kernel, cond, generator).states[:, stop]
    timestep = run.kernel.timestep_of_state(torch.full((BATCH,), stop))
    clean = run.backend.predict_clean(state, timestep, run.backend.eps(state, timestep, cond, finetuned=True))
    manual = -run.reward.log_reward(clean, cond).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert_same_gradients(grads, manual_gradient(run, manual))


def test_refl_calls_the_model_with_gradient_once(monkeypatch):
    run = build_run("method.name=refl")
    calls = EpsCalls(run.backend, monkeypatch)
    _, metrics, _ = method_loss(run, seed=1)
    stop = int(metrics["refl/stop_state"])
    assert 7 <= stop <= 9 and len(calls.calls) == stop + 1  # the chain to x_s, then one call at x_s
    assert calls.with_gradient() == [(run.kernel.state_timesteps[stop].item(), BATCH)]


# -- AlignProp -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,fractions,expected", [(50, (0.1, 0.3), (5, 15)), (10, (0.1, 0.3), (1, 3)),
                                                      (10, (1.0, 1.0), (10, 10)), (10, (0.0, 0.0), (1, 1))])
def test_alignprop_truncation_range(steps, fractions, expected):
    run = build_run("method.name=alignprop", f"sampler.steps={steps}", f"method.truncation={list(fractions)}",
                    perturb=False)
    assert run.method.truncation_range() == expected


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_alignprop_backpropagates_through_the_drawn_last_steps_with_checkpointing(monkeypatch, seed):
    run = build_run("method.name=alignprop", "method.truncation=[0.1,0.5]")
    calls = EpsCalls(run.backend, monkeypatch)
    _, metrics, _ = method_loss(run, seed=seed)
    steps = int(metrics["alignprop/backprop_steps"])
    assert steps == draw_int(1, 5, torch.Generator().manual_seed(seed))
    last = [(t, BATCH) for t in run.kernel.state_timesteps[10 - steps : 10].tolist()]
    assert calls.with_gradient() == last + last[::-1]  # forward, then recomputed in the backward pass


def test_alignprop_gradient_matches_a_manual_truncated_chain():
    run = build_run("method.name=alignprop", "method.truncation=[0.3,0.3]")  # T = 3
    loss, _, grads = method_loss(run, seed=6)
    cond = cond_of(run)
    generator = torch.Generator().manual_seed(6)
    draw_int(3, 3, generator)  # the truncation draw
    trajectories = rollout(run.backend, run.kernel, cond, generator)
    x = trajectories.states[:, 7]
    for index in range(7, 10):  # reparameterised steps: the noise the chain used, gradient through x and θ
        mean, _ = last_step(run, x, cond, index)
        x = mean + (trajectories.states[:, index + 1] - mean.detach())
    manual = -run.reward.log_reward(x, cond).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert_same_gradients(grads, manual_gradient(run, manual))


# -- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_short_gmm_run_raises_the_reward(name, tmp_path, monkeypatch):
    config = load_config(None, [*FAST, f"method.name={name}", "train.trajectories_per_epoch=64", "train.batch_size=32",
                                "train.updates=30", "train.eval_samples=500", "train.eval_every=1000"])
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)

    sample_only = trainer.run.rollout

    def no_recorded_rollouts(cond, generator, finetuned=True, record=True):
        assert not record, "the trainer rolled out trajectories the method does not use"
        return sample_only(cond, generator, finetuned, record)  # evaluation samples

    monkeypatch.setattr(trainer.run, "rollout", no_recorded_rollouts)  # training epochs are conditions only
    final = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    initial = records[0]["eval/log_reward_mean"]
    assert "mode_tv" not in final  # reward maximisers have no target distribution
    assert final["log_reward_mean"] > initial + 2, (initial, final["log_reward_mean"])  # ≈ −8.4 → −3 … −4.6
    assert final["log_reward_std"] < records[0]["eval/log_reward_std"]  # they concentrate
    losses = [r for r in records if "loss" in r]
    assert all(math.isfinite(r["loss"]) and "loss/log_reward_mean" in r for r in losses)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


def sd_overrides(pipeline_dir, name: str) -> list[str]:
    return ["model.kind=stable_diffusion", f"model.path={pipeline_dir}", "model.dtype=fp32",
            "model.flow_channels=[8,16]", "reward.kind=brightness", "sampler.steps=3", f"method.name={name}",
            "train.trajectories_per_epoch=2", "train.batch_size=2", "train.updates=1", "train.eval_samples=2"]


DIGITS = ["model.kind=digits", "sampler.steps=5", "train.updates=1", "train.trajectories_per_epoch=4",
          "train.batch_size=2", "train.eval_samples=4"]


@pytest.fixture(scope="module")
def sd_run(pipeline_dir):
    return Run.build(load_config(None, sd_overrides(pipeline_dir, "draft")))


@pytest.fixture(scope="module")
def digits_run():
    return Run.build(load_config(None, [*DIGITS, "method.name=draft"]))


@pytest.mark.parametrize("model", ["sd", "digits"])
@pytest.mark.parametrize("name", METHODS)
def test_loss_and_gradient_on_image_models(request, model, name):
    """Each method on the tiny SD pipeline (UNet with CFG and LoRA, VAE decode) and on digits: a finite loss whose
    gradient reaches the adapter only."""
    run = request.getfixturevalue(f"{model}_run")
    extra = ["method.backprop_steps=2"] if name == "draft" else []
    config = load_config(None, [*DIGITS, f"method.name={name}", *extra]).method
    method = build_method(config, run.backend, run.reward, run.kernel)
    run.backend.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    trajectories = run.rollout(run.backend.sample_conditions(2, generator), generator)
    loss, metrics = method.trajectory_loss(trajectories, generator)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in metrics.values())
    trainable = {id(p) for p in run.backend.trainable_parameters()}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.backend.trainable_parameters())
    assert all(torch.isfinite(p.grad).all() for p in run.backend.trainable_parameters() if p.grad is not None)
    assert all(p.grad is None for p in run.backend.parameters() if id(p) not in trainable)


@pytest.mark.parametrize("name", ["alignprop", "draft_lv"])
def test_training_step_on_tiny_stable_diffusion(pipeline_dir, tmp_path, name):
    trainer = Trainer.from_config(load_config(None, sd_overrides(pipeline_dir, name)), tmp_path / "run", progress=False)
    backend = trainer.run.backend
    trainable = {id(p) for p in backend.trainable_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in backend.named_parameters() if id(p) not in trainable}
    lora_before = {k: v.clone() for k, v in backend.adapter_state_dict().items()}
    trainer.train()
    assert not list(trainer.run.method.networks.parameters())  # no networks of their own
    assert all(torch.equal(frozen_before[n], p) for n, p in backend.named_parameters() if id(p) not in trainable)
    lora_after = backend.adapter_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)


def test_training_step_on_digits(tmp_path):
    trainer = Trainer.from_config(load_config(None, [*DIGITS, "method.name=refl"]), tmp_path / "run", progress=False)
    lora_before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(r["loss"]) for r in records if "loss" in r] == [True]
    lora_after = trainer.run.backend.adapter_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)


def test_classes_are_registered():
    from nablagfn.methods import method_class

    assert [method_class(name) for name in METHODS] == [ReFL, DRaFT, DRaFTLV, AlignProp]
