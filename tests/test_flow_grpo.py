"""Flow-GRPO: group-normalised advantages over whole groups, grouped epoch conditions, ratio 1 on-policy, the KL to
the pretrained policy, and a flow-mixture run that raises the reward (on the flow SDE and on DDPM)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nablagfn.config import ConfigError
from nablagfn.config_loading import load_config
from nablagfn.methods.flow_grpo import group_advantages
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer

FAST = ["model.kind=gmm", "model.parameterization=flow", "sampler.steps=10", "model.hidden=32", "model.layers=2",
        "method.name=flow_grpo", "method.group_size=4", "train.trajectories_per_epoch=16", "train.batch_size=16",
        "train.on_policy=true"]


def test_group_advantages_are_normalised_within_each_group_and_clipped():
    rewards = torch.tensor([1.0, 3.0, 5.0, 7.0, -1.0, -1.0, 0.0, 10.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    advantages = group_advantages(rewards, group, clip=1.5)
    first = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(advantages[:4], ((first - 4) / (first.std(unbiased=False) + 1e-4)).clamp(-1.5, 1.5))
    second = rewards[4:]
    torch.testing.assert_close(advantages[4:], ((second - 2) / (second.std(unbiased=False) + 1e-4)).clamp(-1.5, 1.5))
    assert advantages[7] == 1.5  # clipped
    # a group of equal rewards has zero advantages, not NaN
    assert group_advantages(torch.zeros(4), torch.zeros(4, dtype=torch.long), 5.0).eq(0).all()


def test_epoch_conditions_come_in_consecutive_groups_and_advantages_use_whole_groups():
    run = Run.build(load_config(None, FAST))
    run.backend.sample_conditions = lambda num, generator, split="train": torch.arange(num) + 10
    cond = run.method.epoch_conditions(16, torch.Generator().manual_seed(0))
    assert cond.tolist() == [10] * 4 + [11] * 4 + [12] * 4 + [13] * 4
    with pytest.raises(ValueError, match="method.group_size=4"):
        run.method.epoch_conditions(10, torch.Generator())

    run = Run.build(load_config(None, FAST))
    generator = torch.Generator().manual_seed(0)
    trajectories = run.method.prepare_epoch(run.rollout(run.method.epoch_conditions(16, generator), generator))
    by_group = trajectories.advantage.reshape(4, 4)
    torch.testing.assert_close(by_group.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    # a minibatch carries the advantages computed over the whole epoch, not renormalised over its rows
    subset = trajectories.select(torch.tensor([0, 5, 9]))
    assert torch.equal(subset.advantage, trajectories.advantage[[0, 5, 9]])


def test_group_size_must_divide_the_epoch():
    with pytest.raises(ConfigError, match="method.group_size=6"):
        load_config(None, [*FAST, "method.group_size=6"])


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_ratio_is_one_and_the_kl_starts_at_zero(tmp_path):
    config = load_config(None, [*FAST, "train.updates=2", "train.eval_every=2", "train.eval_samples=16",
                                "train.log_every=1"])
    Trainer.from_config(config, tmp_path / "run", progress=False).train()
    losses = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    # each update trains on its own epoch, sampled by the same weights: r = exp(ℓ_θ − ℓ_old) = 1
    for record in losses:
        assert record["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert record["ppo/approx_kl"] < 1e-12 and record["ppo/clip_fraction"] == 0
    assert losses[0]["grpo/kl"] == 0.0  # finetuned = pretrained at the start
    assert losses[1]["grpo/kl"] > 0


def test_kl_term_is_the_gaussian_kl_to_the_pretrained_step():
    run = Run.build(load_config(None, [*FAST, "method.kl_weight=1.0", "method.clip_range=10"]))
    for p in run.backend.trainable_parameters():
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)
    trajectories = run.method.prepare_epoch(run.rollout(run.method.epoch_conditions(16, generator), generator))
    trajectories.advantage = torch.zeros_like(trajectories.advantage)  # the loss is the KL alone
    loss, metrics = run.method.trajectory_loss(trajectories, torch.Generator())
    kernel, total = run.kernel, 0.0
    for k in range(kernel.num_steps):
        step = torch.full((16,), k)
        x, t = trajectories.states[:, k], kernel.timestep_of_state(step)
        policy = torch.distributions.Normal(kernel.mean(x, run.backend.eps(x, t, trajectories.cond), step), kernel.std[k])
        reference = torch.distributions.Normal(
            kernel.mean(x, run.backend.eps(x, t, trajectories.cond, finetuned=False), step), kernel.std[k]
        )
        total = total + torch.distributions.kl_divergence(policy, reference).mean()
    assert loss.item() == pytest.approx((total / kernel.num_steps).item(), rel=1e-4)
    assert metrics["grpo/kl"] > 0


@pytest.mark.parametrize("sampler", ["model.parameterization=flow", "model.parameterization=eps"])
def test_mixture_run_raises_the_reward(tmp_path, sampler):
    config = load_config(None, [*FAST, sampler, "method.group_size=8", "train.trajectories_per_epoch=64",
                                "train.batch_size=64", "train.updates=25", "train.eval_every=25",
                                "train.eval_samples=400", "train.log_every=5",
                                "train.policy_optimizer.lr=0.01"])
    final = Trainer.from_config(config, tmp_path / "run", progress=False).train()
    records = read_metrics(tmp_path / "run")
    start = records[0]["eval/log_reward_mean"]
    assert final["log_reward_mean"] > start + 2.0, (start, final)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
