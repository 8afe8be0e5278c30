"""GRAFT / P-GRAFT: acceptance rules, the partial denoising target, P-GRAFT's switch to the pretrained model at k_I,
an empty accepted set, GMM runs toward p·R^β, and training steps with a non-differentiable reward (digits, SD)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_sd import save_tiny_sd

from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.methods.graft import group_max, partial_noising, rejection_acceptance, top_k_mask
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer

FAST = ["model.kind=gmm", "sampler.steps=10", "model.hidden=32", "model.layers=2"]


def build_run(*overrides: str) -> Run:
    return Run.build(load_config(None, [*FAST, *overrides]))


# -- selection --------------------------------------------------------------------------------------------------------
def test_rejection_acceptance_probabilities():
    log_reward = torch.tensor([-1.0, 0.0, -3.0, 0.5])
    torch.testing.assert_close(rejection_acceptance(log_reward, 0.5, 0.0),
                               torch.tensor([math.exp(-0.5), 1.0, math.exp(-1.5), 1.0]))  # above the bound: 1
    cond, values = torch.tensor([0, 1, 0, 1]), torch.tensor([-2.0, 1.0, 3.0, -5.0])
    assert group_max(values, cond).tolist() == [3.0, 1.0, 3.0, 1.0]


def test_rejection_sampling_accepts_in_proportion_to_exp_beta_r():
    run = build_run("method.name=graft", "method.beta=0.7", "method.log_reward_max=0")
    levels = torch.tensor([0.0, -1.0, -2.5])
    log_reward = levels.repeat(20_000)
    accepted = run.method.accept(log_reward, torch.zeros(60_000, dtype=torch.long), torch.Generator().manual_seed(0))
    rates = accepted.reshape(-1, 3).float().mean(0)
    torch.testing.assert_close(rates, torch.exp(0.7 * levels), atol=0.012, rtol=0)
    # without a known bound, each group's maximum (here per prompt) takes the bound's place
    run = build_run("method.name=graft", "method.beta=1.0", "method.group=prompt")
    cond = torch.tensor([0, 0, 1, 1]).repeat(20_000)
    log_reward = torch.tensor([2.0, 1.0, -1.0, -3.0]).repeat(20_000)
    rates = run.method.accept(log_reward, cond, torch.Generator().manual_seed(1)).reshape(-1, 4).float().mean(0)
    torch.testing.assert_close(rates, torch.tensor([1.0, math.exp(-1), 1.0, math.exp(-2)]), atol=0.012, rtol=0)


def test_top_k_and_threshold_selection():
    cond = torch.tensor([0, 0, 0, 0, 1, 1])
    log_reward = torch.tensor([1.0, 4.0, 2.0, 3.0, 9.0, 5.0])
    assert top_k_mask(log_reward, cond, 0.5).nonzero().squeeze(1).tolist() == [1, 3, 4]  # 2 of 4, 1 of 2
    assert top_k_mask(log_reward, torch.zeros_like(cond), 0.5).nonzero().squeeze(1).tolist() == [1, 4, 5]
    assert top_k_mask(log_reward, cond, 0.01).sum() == 2  # at least one per group
    run = build_run("method.name=graft", "method.selection=top_k", "method.group=prompt", "method.top_k_fraction=0.5")
    assert run.method.accept(log_reward, cond, torch.Generator()).nonzero().squeeze(1).tolist() == [1, 3, 4]
    run = build_run("method.name=graft", "method.selection=threshold", "method.threshold=3")
    assert run.method.accept(log_reward, cond, torch.Generator()).tolist() == [False, True, False, True, True, True]
    with pytest.raises(ConfigError, match="method.threshold"):
        load_config(None, [*FAST, "method.name=graft", "method.selection=threshold"])


def test_exact_target_is_the_tilt_with_the_pretrained_prior():
    run = build_run("method.name=graft", "method.beta=0.7")
    assert run.config.method.prior_strength == 1.0
    target = run.exact_target()
    expected = run.reward.tilt(run.backend.mixture, 0.7)
    torch.testing.assert_close(target.weights, expected.weights)
    assert build_run("method.name=pgraft").exact_target() is not None


# -- denoising target -------------------------------------------------------------------------------------------------
def test_partial_denoising_target_is_the_eps_of_the_noised_intermediate_distribution():
    """y ~ p_{t_I} (the mixture noised to t_I), x_t from y by the forward process: the pretrained ε(x_t, t) is the
    minimiser of ‖scale·ε − z‖², so scale·ε# − z is orthogonal to functions of x_t; without the scale it is not."""
    run = build_run()
    backend, generator = run.backend, torch.Generator().manual_seed(0)
    abar = backend.schedule.alphas_cumprod
    t_data, t = 300, 500
    n = 200_000
    clean = backend.mixture.sample(n, generator).double()
    y = abar[t_data].sqrt() * clean + (1 - abar[t_data]).sqrt() * torch.randn(clean.shape, generator=generator,
                                                                              dtype=torch.float64)
    z = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    level = torch.full((n,), abar[t])
    x_t, scale = partial_noising(y, z, (level.sqrt(), (1 - level).sqrt()),
                                 (float(abar[t_data].sqrt()), float((1 - abar[t_data]).sqrt())))
    assert torch.all(scale < 1)  # ε is larger than the partial noise z it predicts
    eps = backend.pretrained_eps(x_t, torch.full((n,), t))
    moment = ((scale * eps - z)[:, :, None] * x_t[:, None, :]).mean(0)  # E[(scale·ε − z) x_tᵀ]
    assert moment.abs().max() < 0.01, moment
    wrong = ((eps - z)[:, :, None] * x_t[:, None, :]).mean(0)
    assert wrong.abs().max() > 0.04
    # GRAFT's level (ᾱ_data = 1) is the plain DDPM noising with scale 1
    x_t, scale = partial_noising(clean, z, (level.sqrt(), (1 - level).sqrt()), (1.0, 0.0))
    torch.testing.assert_close(scale, torch.ones_like(scale))
    torch.testing.assert_close(x_t, abar[t].sqrt() * clean + (1 - abar[t]).sqrt() * z)


def test_training_timesteps_lie_above_the_data_level():
    for name, overrides in (("graft", ()), ("pgraft", ("method.intermediate_fraction=0.3",))):
        for kind in ("sampler", "uniform"):
            run = build_run(f"method.name={name}", f"method.timesteps={kind}", *overrides)
            method, kernel = run.method, run.kernel
            timesteps = method.training_timesteps(5000, torch.Generator().manual_seed(0))
            level = int(kernel.state_timesteps[method.data_state])
            assert timesteps.min() > level or (name == "graft" and timesteps.min() >= 0)
            if kind == "sampler":
                assert set(timesteps.tolist()) == set(kernel.state_timesteps[: method.data_state].tolist())
    assert build_run("method.name=pgraft", "method.intermediate_fraction=0.3").method.data_state == 3


# -- P-GRAFT's sampling policy ----------------------------------------------------------------------------------------
def test_pgraft_samples_with_the_finetuned_model_above_t_i_and_the_pretrained_one_below():
    run = build_run("method.name=pgraft", "method.intermediate_fraction=0.4")
    assert run.method.data_state == 4
    assert [run.method.sampling_policy(k) for k in range(10)] == [True] * 4 + [False] * 6
    assert all(build_run("method.name=graft").method.sampling_policy(k) for k in range(10))
    torch.nn.init.constant_(run.backend.residual.out.bias, 1.0)  # the finetuned ε now differs by 1
    generator = torch.Generator().manual_seed(0)
    trajectories = run.rollout(run.backend.sample_conditions(64, generator), generator)
    for k in range(10):
        x, t = trajectories.states[:, k], run.kernel.timestep_of_state(torch.full((64,), k))
        expected = run.backend.eps(x, t, trajectories.cond, finetuned=k < 4)
        torch.testing.assert_close(trajectories.eps[:, k], expected)
    # evaluation samples follow the same rule
    final, _ = run.sample_with_conditions(8, seed=3)
    generator = torch.Generator().manual_seed(3)
    cond = run.backend.sample_conditions(8, generator)
    from nablagfn.mdp import rollout

    torch.testing.assert_close(final, rollout(run.backend, run.kernel, cond, generator, lambda k: k < 4, record=False))


# -- losses -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["graft", "pgraft"])
@pytest.mark.parametrize("proposal", ["pretrained", "current"])
def test_loss_trains_the_adapter_on_accepted_samples(name, proposal):
    run = build_run(f"method.name={name}", f"method.proposal={proposal}")
    generator = torch.Generator().manual_seed(0)
    trajectories = run.rollout(run.backend.sample_conditions(64, generator), generator)
    loss, metrics = run.method.trajectory_loss(trajectories, generator)
    assert 0 < metrics["graft/accept_rate"] < 1 and math.isfinite(loss.item()) and loss.item() > 0
    assert metrics["graft/accepted_log_reward"] > metrics["graft/proposal_log_reward"]
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in run.backend.trainable_parameters())
    assert sum(p.grad.abs().sum() for p in run.backend.trainable_parameters()) > 0


def test_empty_accepted_set_gives_a_zero_loss_and_a_clean_update(tmp_path):
    overrides = [*FAST, "method.name=graft", "method.selection=threshold", "method.threshold=1e9",
                 "train.trajectories_per_epoch=16", "train.batch_size=16", "train.updates=2", "train.eval_samples=50"]
    run = Run.build(load_config(None, overrides))
    generator = torch.Generator().manual_seed(0)
    loss, metrics = run.method.trajectory_loss(run.rollout(run.backend.sample_conditions(16, generator), generator),
                                               generator)
    assert loss.item() == 0 and metrics["graft/accept_rate"] == 0
    loss.backward()
    assert all(p.grad is None for p in run.backend.trainable_parameters())
    trainer = Trainer.from_config(load_config(None, overrides), tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r] == [0.0]
    assert all(torch.equal(before[k], v) for k, v in trainer.run.backend.adapter_state_dict().items())


@pytest.mark.parametrize("proposal,records", [("pretrained", False), ("current", True)])
def test_trainer_rolls_out_epochs_only_for_the_current_proposal(tmp_path, monkeypatch, proposal, records):
    overrides = [*FAST, "method.name=graft", f"method.proposal={proposal}", "train.trajectories_per_epoch=16",
                 "train.batch_size=16", "train.updates=2", "train.eval_samples=50"]
    trainer = Trainer.from_config(load_config(None, overrides), tmp_path / "run", progress=False)
    recorded = []
    sample = trainer.run.rollout

    def counting_rollout(cond, generator, finetuned=True, record=True):
        recorded.append(record)
        return sample(cond, generator, finetuned, record)

    monkeypatch.setattr(trainer.run, "rollout", counting_rollout)
    trainer.train()
    assert any(recorded) == records
    assert (tmp_path / "run" / "checkpoints" / "update_0000002").is_dir()


# -- runs -------------------------------------------------------------------------------------------------------------
def gmm_run(tmp_path, *overrides: str) -> tuple[dict, dict]:
    config = load_config(None, [*FAST, *overrides, "train.trajectories_per_epoch=64", "train.batch_size=32",
                                "train.updates=40", "train.eval_every=40", "train.eval_samples=500",
                                "train.policy_optimizer.lr=1e-2"])
    final = Trainer.from_config(config, tmp_path, progress=False).train()
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    return {k.removeprefix("eval/"): v for k, v in start.items()}, final


def test_graft_gmm_run_moves_toward_the_tilted_target(tmp_path):
    start, final = gmm_run(tmp_path, "method.name=graft", "method.log_reward_max=0")
    assert final["log_reward_mean"] > start["log_reward_mean"] + 2.0, (start, final)
    assert final["mode_tv"] < start["mode_tv"] - 0.2, (start, final)


def test_pgraft_gmm_run_raises_the_reward(tmp_path):
    start, final = gmm_run(tmp_path, "method.name=pgraft", "method.log_reward_max=0")
    assert final["log_reward_mean"] > start["log_reward_mean"] + 2.0, (start, final)
    assert final["mode_tv"] < start["mode_tv"] - 0.2, (start, final)


@pytest.mark.parametrize("name", ["graft", "pgraft"])
def test_digits_training_step_with_jpeg_reward(tmp_path, name):
    config = load_config(None, ["model.kind=digits", f"method.name={name}", "reward.kind=jpeg_compressibility",
                                "method.selection=top_k", "sampler.steps=5", "train.updates=1",
                                "train.trajectories_per_epoch=4", "train.batch_size=2", "train.eval_samples=4"])
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    trainer.train()
    after = trainer.run.backend.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["graft", "pgraft"])
def test_stable_diffusion_training_step_with_jpeg_reward(tmp_path_factory, name):
    pipeline = tmp_path_factory.getbasetemp() / "tiny_sd_pipeline"
    if not pipeline.exists():
        save_tiny_sd(pipeline)
    run_dir = tmp_path_factory.mktemp(name)
    config = load_config(None, [
        "model.kind=stable_diffusion", f"model.path={pipeline}", "model.dtype=fp32", "model.flow_channels=[8,16]",
        "reward.kind=jpeg_compressibility", "sampler.steps=3", f"method.name={name}", "method.selection=top_k",
        "train.trajectories_per_epoch=2", "train.batch_size=2", "train.updates=1", "train.eval_samples=2",
    ])
    trainer = Trainer.from_config(config, run_dir, progress=False)
    before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    trainer.train()
    after = trainer.run.backend.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if name == "pgraft":  # 3 steps, fraction 0.5: the finetuned model takes steps 0 and 1
        assert [trainer.run.method.sampling_policy(k) for k in range(3)] == [True, True, False]
