"""DDPO: the PPO clipped loss by hand, per-prompt advantage normalisation with a buffer, element-mean log-probs,
a GMM run that raises the reward, and training steps with a non-differentiable reward on the digits model and SD."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_sd import save_tiny_sd

from nablagfn.config_loading import load_config
from nablagfn.methods.ddpo import PromptRewardBuffer, normalised_advantages, ppo_clipped_loss
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer

FAST = ["model.kind=gmm", "sampler.steps=10", "model.hidden=32", "model.layers=2", "method.name=ddpo"]


def test_ppo_clipped_loss_by_hand():
    ratios = torch.tensor([1.0, 1.5, 0.5, 1.5], dtype=torch.float64)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.tensor([-0.3, 0.2, 1.0, -2.0], dtype=torch.float64)
    new = (old + ratios.log()).requires_grad_(True)
    loss, metrics = ppo_clipped_loss(new, old, advantages, clip_range=0.1)
    # per sample max(−A r, −A clip(r, 0.9, 1.1)): −1, max(−1.5, −1.1) = −1.1, max(0.5, 0.9) = 0.9, max(1.5, 1.1) = 1.5
    assert loss.item() == pytest.approx((-1 - 1.1 + 0.9 + 1.5) / 4)
    assert metrics["ppo/clip_fraction"] == pytest.approx(0.75)
    assert metrics["ppo/approx_kl"] == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4)
    loss.backward()
    # d(−A r)/d log r = −A r where the unclipped term is the max, 0 where the clipped one is
    torch.testing.assert_close(new.grad, torch.tensor([-0.25, 0.0, 0.0, 1.5 / 4], dtype=torch.float64))


def test_per_prompt_normalisation_with_a_buffer():
    buffer = PromptRewardBuffer(num_conditions=3, size=4)

    def advantages(cond, rewards, clip=5.0):
        return normalised_advantages(torch.tensor(rewards), torch.tensor(cond), buffer, min_count=4, clip=clip)

    # too few rewards per prompt yet: the batch's statistics (population std)
    batch_std = math.sqrt(8 / 3)
    torch.testing.assert_close(advantages([0, 0, 1], [1.0, 3.0, 5.0]), torch.tensor([-2 / batch_std, 0.0, 2 / batch_std]))
    # prompt 0 now has 4 rewards (1, 3, 2, 4): its own statistics
    torch.testing.assert_close(advantages([0, 0], [2.0, 4.0]), torch.tensor([-0.5, 1.5]) / math.sqrt(1.25))
    # the ring buffer drops the oldest reward: (10, 3, 2, 4)
    values = torch.tensor([10.0, 3.0, 2.0, 4.0], dtype=torch.float64)
    expected = (10 - values.mean()) / values.std(unbiased=False)
    torch.testing.assert_close(advantages([0], [10.0]), expected.float().reshape(1))
    # a prompt with more rewards in the batch than the buffer holds uses all of them; advantages are clipped
    rewards = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    own = torch.tensor(rewards, dtype=torch.float64)
    torch.testing.assert_close(advantages([1] * 6, rewards, clip=1.2),
                               ((own - 2.5) / own.std(unbiased=False)).clamp(-1.2, 1.2).float())
    assert buffer.count.tolist() == [5, 7, 0]


def test_buffer_is_checkpointed_with_the_method():
    run = Run.build(load_config(None, FAST))
    buffer = run.method.networks["reward_buffer"]
    buffer.add(torch.tensor([0, 0]), torch.tensor([1.5, -2.0]))
    state = run.method.networks.state_dict()
    assert set(state) == {"reward_buffer.values", "reward_buffer.count"}
    fresh = Run.build(load_config(None, FAST))
    fresh.method.networks.load_state_dict(state)
    assert fresh.method.networks["reward_buffer"].recent(0).tolist() == [1.5, -2.0]


def test_loss_uses_element_mean_log_probs_and_is_the_policy_gradient_on_policy():
    run = Run.build(load_config(None, [*FAST, "method.per_prompt=false", "model.means=[[0,0,0],[1,1,1]]",
                                       "model.stds=[0.5,0.5]", "reward.center=[1,0,0]"]))
    generator = torch.Generator().manual_seed(0)
    trajectories = run.rollout(run.backend.sample_conditions(16, generator), generator)
    for p in run.backend.trainable_parameters():  # move away from zero so every parameter gets a gradient
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    trajectories = run.rollout(trajectories.cond, generator)  # on-policy data for the perturbed policy
    loss, metrics = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(2))
    assert metrics["ppo/clip_fraction"] == 0 and metrics["ppo/approx_kl"] < 1e-12
    loss.backward()
    params = run.backend.trainable_parameters()
    grads = [p.grad.clone() for p in params]
    run.backend.zero_grad()

    # at r = 1 the PPO gradient is that of −mean(A · log P_θ / d) with d = 3 state elements
    kernel, K = run.kernel, run.kernel.num_steps
    rewards = trajectories.log_reward
    advantages = ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)).clamp(-5, 5)
    total = 0.0
    for k in range(K):
        step = torch.full((16,), k)
        x = trajectories.states[:, k]
        eps = run.backend.eps(x, kernel.timestep_of_state(step), trajectories.cond)
        log_prob = kernel.log_prob(trajectories.states[:, k + 1], kernel.mean(x, eps, step), step) / 3
        total = total - (advantages * log_prob).sum()
    (total / (16 * K)).backward()
    assert any(g.abs().sum() > 0 for g in grads)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gmm_run_raises_the_reward(tmp_path):
    config = load_config(None, [*FAST, "method.clip_range=0.1", "train.on_policy=true", "train.trajectories_per_epoch=64",
                                "train.batch_size=32", "train.updates=30", "train.eval_every=30",
                                "train.eval_samples=500", "train.log_every=1"])
    final = Trainer.from_config(config, tmp_path / "run", progress=False).train()
    records = read_metrics(tmp_path / "run")
    start = records[0]["eval/log_reward_mean"]
    assert final["log_reward_mean"] > start + 2.0, (start, final)
    losses = [r for r in records if "loss" in r]
    assert all(math.isfinite(r["loss"]) and 0 <= r["ppo/clip_fraction"] <= 1 for r in losses)
    # the second minibatch of an epoch sees a policy moved by one update: some ratios leave 1 ± 1e-4
    assert max(r["ppo/clip_fraction"] for r in losses) > 0


def adapter_changed(trainer: Trainer, before: dict) -> bool:
    after = trainer.run.backend.adapter_state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_digits_training_step_with_jpeg_reward(tmp_path):
    config = load_config(None, ["model.kind=digits", "method.name=ddpo", "reward.kind=jpeg_compressibility",
                                "sampler.steps=5", "train.updates=1", "train.trajectories_per_epoch=4",
                                "train.batch_size=2", "train.eval_samples=4", "train.on_policy=true"])
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    trainer.train()
    assert adapter_changed(trainer, before)
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run") if "loss" in r)


def test_stable_diffusion_training_step_with_jpeg_reward(tmp_path):
    pipeline = save_tiny_sd(tmp_path / "pipeline")
    config = load_config(None, [
        "model.kind=stable_diffusion", f"model.path={pipeline}", "model.dtype=fp32", "model.flow_channels=[8,16]",
        "reward.kind=jpeg_compressibility", "sampler.steps=3", "method.name=ddpo", "train.on_policy=true",
        "train.trajectories_per_epoch=2", "train.batch_size=2", "train.updates=1", "train.eval_samples=2",
    ])
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    trainer.train()
    assert adapter_changed(trainer, before)
    # one buffer row per prompt; the two rewards of the epoch are in it
    buffer = trainer.run.method.networks["reward_buffer"]
    assert buffer.count.shape == (len(trainer.run.backend.prompts),) and int(buffer.count.sum()) == 2
