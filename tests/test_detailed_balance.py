"""Scalar-flow detailed balance: residual DB (eq. 20) and DAG-DB.

The residual is checked to be exactly zero on a hand-built case where the policy and the flow satisfy
residual DB everywhere, and against an independent computation of the DAG-DB residual; then the β ramp,
the output regularisation, the exact targets, gradient-free rewards, and short runs on every backend.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.mdp import rollout
from nablagfn.methods import make_transitions, subsample_steps
from nablagfn.methods.detailed_balance import DAGDB, ResidualDB
from nablagfn.rewards.vector import GaussianReward
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer

FAST = ["model.kind=gmm", "sampler.steps=10", "model.hidden=32", "model.layers=2"]
# one Gaussian component and a linear reward: every kernel mean is affine in the state, so residual DB has an
# exact solution in the policy family (below)
ONE_GAUSSIAN = ["model.kind=gmm", "model.means=[[0.5,-0.3]]", "model.stds=[0.7]", "reward.kind=linear",
                "reward.direction=[1.0,-0.5]", "sampler.steps=6", "model.hidden=16", "model.layers=1"]


def build_run(*overrides: str) -> Run:
    return Run.build(load_config(None, list(overrides)))


def trajectories_of(run: Run, num: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    cond = run.backend.sample_conditions(num, generator)
    trajectories = rollout(run.backend, run.kernel, cond, generator)
    trajectories.log_reward = run.log_reward(trajectories.final, trajectories.cond)
    return trajectories


# -- an exact residual-DB solution --------------------------------------------------------------------------------
class ExactResidualSolution:
    """log F̃ and the finetuned ε that satisfy F̃(x_k) P_F(x_{k+1}|x_k) = P#(x_{k+1}|x_k) F̃(x_{k+1}) for every pair.

    With log F̃_{k+1}(x') = w_{k+1}·x' + c (affine), P#(x'|x)·exp(w·x') = N(x'; μ# + σ²w, σ²)·exp(w·μ# + σ²|w|²/2),
    so P_F = N(μ# + σ_k² w_{k+1}, σ_k²) (ε_θ = ε# + σ_k² w_{k+1}/b_k) and log F̃_k(x) = log F̃_{k+1}(μ#_k(x)) +
    σ_k²|w_{k+1}|²/2, affine again because μ# is affine for a single Gaussian; log F̃_K = β log R."""

    def __init__(self, run: Run, beta: float):
        self.run, self.beta = run, beta
        self.K = run.kernel.num_steps

    def pretrained_mean(self, x, k):
        step = torch.full((x.shape[0],), k)
        eps = self.run.backend.eps(x, self.run.kernel.timestep_of_state(step), None, finetuned=False)
        return self.run.kernel.mean(x, eps, step)

    def log_flow(self, x, k):
        if k == self.K:
            return self.beta * self.run.reward.log_reward(x, None)
        w = self.slope(k + 1)
        variance = float(self.run.kernel.std[k]) ** 2
        return self.log_flow(self.pretrained_mean(x, k), k + 1) + 0.5 * variance * (w @ w)

    def slope(self, k):
        x = torch.zeros(1, self.run.backend.sample_shape[0], dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(self.log_flow(x, k).sum(), x)
        return grad[0]

    def eps_shift(self, k):
        return float(self.run.kernel.std[k]) ** 2 * self.slope(k + 1) / float(self.run.kernel.eps_coef[k])


class TimestepShift(nn.Module):
    """ε residual: a constant vector per diffusion timestep."""

    def __init__(self, shifts: dict[int, torch.Tensor]):
        super().__init__()
        self.shifts = shifts
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, timestep):
        return torch.stack([self.shifts[int(t)] for t in timestep]).to(x) + 0 * self.dummy


class ExactLearnedFlow(nn.Module):
    """The flow network's share of the exact log F̃: log F̃(x_k) − β log R(x̂(x_k)), in the method's units."""

    def __init__(self, method: ResidualDB, solution: ExactResidualSolution):
        super().__init__()
        self.method, self.solution = method, solution

    def forward(self, x, timestep, state_index, cond):
        out = torch.empty(x.shape[0], dtype=x.dtype)
        for k in state_index.unique().tolist():
            rows = state_index == k
            exact = self.solution.log_flow(x[rows].double(), k).to(x.dtype)
            lookahead = self.method.lookahead_log_reward(x[rows], state_index[rows], cond[rows])
            out[rows] = (exact - self.method.beta_now() * lookahead) / self.method.unit
        return out


@pytest.mark.parametrize("reduction,lookahead", [("mean", "finetuned"), ("sum", "pretrained")])
def test_residual_db_is_zero_on_an_exact_balance(reduction, lookahead):
    beta = 0.8
    run = build_run(*ONE_GAUSSIAN, "method.name=residual_db", f"method.beta={beta}", "method.beta_ramp=0",
                    f"method.log_prob_reduction={reduction}", f"method.lookahead={lookahead}", "method.subsample.kind=all")
    solution = ExactResidualSolution(run, beta)
    timesteps = run.kernel.state_timesteps
    run.backend.residual = TimestepShift({int(timesteps[k]): solution.eps_shift(k).float() for k in range(solution.K)})
    run.method.networks["flow"] = ExactLearnedFlow(run.method, solution)

    trajectories = trajectories_of(run)  # sampled by the exact finetuned policy
    loss, metrics = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(1))
    assert metrics["db/residual_abs"] < 2e-4, metrics
    assert metrics["loss/output_reg"] < 1e-10 and loss.item() < 1e-7

    # the same flow with the pretrained policy does not balance
    run.backend.residual = TimestepShift({int(t): torch.zeros(2) for t in timesteps[:-1]})
    _, metrics = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(1))
    assert metrics["db/residual_abs"] > 0.01


# -- the DAG-DB residual, computed independently -----------------------------------------------------------------
def normal_log_density(x, mean, std):
    """Summed log N(x; mean, std²) with its normalising constant removed (the method's convention)."""
    dims = x[0].numel()
    full = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).sum(1)
    return full + dims * (torch.log(torch.as_tensor(std)).flatten()[0] + 0.5 * math.log(2 * math.pi))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dag_db_residual_matches_a_hand_computation(reduction):
    beta = 0.7
    run = build_run(*FAST, "method.name=dag_db", f"method.beta={beta}", "method.beta_ramp=0",
                    f"method.log_prob_reduction={reduction}", "method.subsample.kind=all")
    assert isinstance(run.method, DAGDB) and run.method.prior_strength == 0
    with torch.no_grad():  # a non-trivial finetuned policy and flow network
        for p in [*run.backend.trainable_parameters(), *run.method.networks["flow"].parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trajectories = trajectories_of(run, num=8)
    rows, steps = subsample_steps(8, run.kernel.num_steps, "all", 1.0, torch.Generator())
    batch = make_transitions(trajectories, rows, steps)
    _, metrics = run.method.loss(batch, torch.Generator(), trajectories.log_reward[rows])

    kernel, backend, reward, K = run.kernel, run.backend, run.reward, run.kernel.num_steps
    abar = backend.schedule.alphas_cumprod
    unit = 2.0 if reduction == "mean" else 1.0  # the state has 2 elements
    expected = []
    with torch.no_grad():
        for x, x_next, k in zip(batch.state, batch.next_state, batch.step.tolist()):
            x, x_next = x[None], x_next[None]
            t, t_next = int(kernel.state_timesteps[k]), int(kernel.state_timesteps[k + 1])
            tt = torch.tensor([t])
            eps = backend.eps(x, tt, None)
            a, b, std = float(kernel.x_coef[k]), float(kernel.eps_coef[k]), float(kernel.std[k])
            log_pf = normal_log_density(x_next, a * x + b * eps, std)
            r = float(abar[t] / abar[t_next])
            log_pb = normal_log_density(x, math.sqrt(r) * x_next, math.sqrt(1 - r))

            def log_flow(state, index, timestep):
                if index == K:
                    return beta * reward.log_reward(state, None)
                ts = torch.tensor([timestep])
                clean = (state - math.sqrt(1 - float(abar[timestep])) * backend.eps(state, ts, None)) / math.sqrt(
                    float(abar[timestep]))
                flow_net = run.method.networks["flow"]
                learned = flow_net.scale * flow_net.net(state, ts).mean() + flow_net.offset[index]
                return unit * learned + beta * reward.log_reward(clean, None)

            residual = (log_flow(x, k, t) + log_pf - log_pb - log_flow(x_next, k + 1, t_next)) / unit
            expected.append(residual.item())
    expected = torch.tensor(expected)
    torch.testing.assert_close(torch.tensor(metrics["loss/db"]), (expected**2).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(metrics["db/residual_abs"]), expected.abs().mean(), rtol=1e-4, atol=1e-6)


def test_residual_db_with_prior_strength_zero_is_dag_db():
    common = [*FAST, "method.beta_ramp=0", "method.beta=0.5", "method.lookahead=finetuned"]
    residual = build_run(*common, "method.name=residual_db", "method.prior_strength=0")
    dag = build_run(*common, "method.name=dag_db")
    with torch.no_grad():
        for p, q in zip(residual.backend.trainable_parameters(), dag.backend.trainable_parameters()):
            p.add_(0.05)
            q.add_(0.05)
    trajectories = trajectories_of(dag, num=16)
    loss_residual, _ = residual.method.trajectory_loss(trajectories, torch.Generator().manual_seed(3))
    loss_dag, _ = dag.method.trajectory_loss(trajectories, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss_residual, loss_dag)


# -- schedule, regularisation, gradients, targets -----------------------------------------------------------------
def test_beta_ramp():
    run = build_run(*FAST, "method.name=dag_db", "method.beta=2.0")  # reference: ramp over the first half
    method = run.method
    for update, expected in [(0, 0.0), (25, 1.0), (40, 1.6), (50, 2.0), (99, 2.0)]:
        method.set_progress(update, 100)
        assert method.beta_now() == pytest.approx(expected)
    flat = build_run(*FAST, "method.name=residual_db", "method.beta=2.0", "method.beta_ramp=0").method
    flat.set_progress(0, 100)
    assert flat.beta_now() == 2.0
    # the ramped β is the one in the terminal flow: β log R(x_K) at the last transition
    method.set_progress(10, 100)
    x = torch.randn(4, 2)
    final = torch.full((4,), run.kernel.num_steps)
    torch.testing.assert_close(method.log_flow(x, final, torch.zeros(4, dtype=torch.long)),
                               0.4 * run.reward.log_reward(x, None))


def test_output_regularisation_and_gradients():
    run = build_run(*FAST, "method.name=residual_db", "method.output_reg=3.0", "method.beta_ramp=0")
    trajectories = trajectories_of(run, num=16)
    loss, metrics = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(4))
    assert metrics["loss/output_reg"] == 0.0  # the behaviour policy is the current one
    assert loss.item() == pytest.approx(metrics["loss/db"], rel=1e-6)

    trajectories.eps = trajectories.eps + 0.5  # the ε stored at sampling time, shifted
    loss, metrics = run.method.trajectory_loss(trajectories, torch.Generator().manual_seed(4))
    assert metrics["loss/output_reg"] == pytest.approx(0.25, rel=1e-5)
    assert loss.item() == pytest.approx(metrics["loss/db"] + 3.0 * 0.25, rel=1e-5)

    loss.backward()
    groups = run.method.parameter_groups()
    assert set(groups) == {"policy", "flow"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["policy"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["flow"])


def test_flow_starts_at_zero_and_exact_targets():
    run = build_run(*FAST, "method.name=residual_db", "method.beta=0.5")
    flow = run.method.networks["flow"]
    value = flow(torch.randn(5, 2), torch.tensor([981, 500, 300, 100, 1]), torch.arange(5), torch.zeros(5).long())
    assert torch.equal(value, torch.zeros(5))
    target = run.exact_target()  # p · R^β
    tilted = run.reward.tilt(run.backend.mixture, 0.5)
    torch.testing.assert_close(target.means, tilted.means)
    torch.testing.assert_close(target.weights, tilted.weights)

    dag = build_run(*FAST, "method.name=dag_db", "method.beta=0.5")
    target = dag.exact_target()  # R^β alone = N(c, scale²/β)
    assert isinstance(dag.reward, GaussianReward)
    torch.testing.assert_close(target.means, torch.tensor([[3.0, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(target.stds, torch.tensor([2.0**0.5], dtype=torch.float64))


# -- rewards without gradients, and short runs --------------------------------------------------------------------
def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_training_changes_adapter_and_flow(trainer: Trainer) -> None:
    """Train; the adapter and the flow network both change, and every logged loss is finite."""
    before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    flow_before = {k: v.clone() for k, v in trainer.run.method.networks.state_dict().items()}
    trainer.train()
    after = trainer.run.backend.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    flow_after = trainer.run.method.networks.state_dict()
    assert any(not torch.equal(flow_before[k], flow_after[k]) for k in flow_before)
    assert all(math.isfinite(r["loss"]) for r in metrics_of(trainer.run_dir) if "loss" in r)


@pytest.mark.parametrize("name", ["dag_db", "residual_db"])
def test_digits_training_step_with_jpeg_reward(tmp_path, name):
    config = load_config(None, ["model.kind=digits", f"method.name={name}", "reward.kind=jpeg_compressibility",
                                "method.beta_ramp=0", "sampler.steps=5", "train.updates=1", "train.trajectories_per_epoch=4",
                                "train.batch_size=2", "train.eval_samples=4"])
    assert_training_changes_adapter_and_flow(Trainer.from_config(config, tmp_path / "run", progress=False))
    # a gradient method refuses the same reward
    with pytest.raises(ConfigError, match="not differentiable"):
        Run.build(load_config(None, ["model.kind=digits", "reward.kind=jpeg_compressibility"]))


@pytest.fixture(scope="module")
def tiny_sd_pipeline(tmp_path_factory):
    pytest.importorskip("peft")
    from tiny_sd import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


@pytest.mark.parametrize("name", ["dag_db", "residual_db"])
def test_stable_diffusion_training_step(tiny_sd_pipeline, tmp_path_factory, name):
    pipeline = tiny_sd_pipeline
    config = load_config(None, [
        "model.kind=stable_diffusion", f"model.path={pipeline}", "model.dtype=fp32", "model.flow_channels=[8,16]",
        "reward.kind=brightness", "sampler.steps=3", f"method.name={name}", "method.beta=100", "method.beta_ramp=0",
        "train.trajectories_per_epoch=2", "train.batch_size=2", "train.updates=1", "train.eval_samples=2",
    ])
    assert_training_changes_adapter_and_flow(Trainer.from_config(config, tmp_path_factory.mktemp("run"), progress=False))


@pytest.mark.parametrize("name", ["residual_db", "dag_db"])
def test_short_gmm_run_raises_the_reward(tmp_path, name):
    config = load_config(None, [*FAST, f"method.name={name}", "train.trajectories_per_epoch=64", "train.batch_size=32",
                                "train.updates=30", "train.eval_samples=500", "train.eval_every=30",
                                "train.policy_optimizer.lr=3e-3", "train.flow_optimizer.lr=3e-3"])
    final = Trainer.from_config(config, tmp_path / "run", progress=False).train()
    start = metrics_of(tmp_path / "run")[0]["eval/log_reward_mean"]
    assert math.isfinite(final["log_reward_mean"]) and final["log_reward_mean"] > start + 1.0, (start, final)
