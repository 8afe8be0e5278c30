"""Methods: step subsampling, the residual ∇-DB loss (identity, gradients, expected vs sampled target), ∇-DB."""

from __future__ import annotations

import pytest
import torch

from nablagfn.config_loading import load_config
from nablagfn.mdp import rollout
from nablagfn.methods import build_method, make_transitions, subsample_steps
from nablagfn.methods.residual_nabla_db import PretrainedEps, ResidualNablaDB
from nablagfn.rewards import Reward
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer

FAST = ["model.kind=gmm", "sampler.steps=10", "model.hidden=32", "model.layers=2"]


def build_run(*overrides: str) -> Run:
    return Run.build(load_config(None, [*FAST, *overrides]))


def make_batch(run: Run, num_trajectories: int = 16, kind: str = "all", fraction: float = 0.1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    cond = run.backend.sample_conditions(num_trajectories, generator)
    trajectories = rollout(run.backend, run.kernel, cond, generator)
    rows, steps = subsample_steps(num_trajectories, run.kernel.num_steps, kind, fraction, generator)
    return make_transitions(trajectories, rows, steps), trajectories, rows, steps


def grad_norms(parameters) -> float:
    return float(sum(p.grad.abs().sum() for p in parameters if p.grad is not None))


# -- subsampling ----------------------------------------------------------------------------------------------------
def exact_strata(num_steps: int, count: int) -> list[tuple[int, int]]:
    inner = num_steps - 1
    edges = [(j * inner) // count for j in range(count + 1)]
    return [(edges[j], edges[j + 1]) for j in range(count)]


@pytest.mark.parametrize("num_steps,fraction,count", [(50, 0.1, 5), (10, 0.1, 1), (20, 0.25, 5), (20, 0.1, 2),
                                                      (4, 0.9, 3), (6, 0.5, 3)])
def test_stratified_subsampling(num_steps, fraction, count):
    g = torch.Generator().manual_seed(0)
    batch = 3000
    rows, steps = subsample_steps(batch, num_steps, "stratified", fraction, g)
    assert rows.shape == steps.shape == (batch * (count + 1),)
    rows, steps = rows.reshape(batch, count + 1), steps.reshape(batch, count + 1)
    assert torch.equal(rows, torch.arange(batch)[:, None].expand_as(rows))
    assert (steps[:, -1] == num_steps - 1).all()  # the last step is always trained on
    strata = exact_strata(num_steps, count)
    # strata partition the steps 0 … K−2
    assert strata[0][0] == 0 and strata[-1][1] == num_steps - 1
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(strata, strata[1:] + [(strata[-1][1], None)]))
    for j, (low, high) in enumerate(strata):
        column = steps[:, j]
        assert ((column >= low) & (column < high)).all(), f"stratum {j} = [{low}, {high}) violated"
        # uniform within its stratum
        freq = torch.bincount(column - low, minlength=high - low).double() / batch
        assert freq.shape[0] == high - low
        assert (freq - 1 / (high - low)).abs().max() < 0.035
    # each trajectory gets its own draw (unless every stratum is a single step)
    if any(high - low > 1 for low, high in strata):
        assert len({tuple(r) for r in steps.tolist()}) > 1


def test_stratified_subsampling_over_many_step_counts():
    g = torch.Generator().manual_seed(1)
    for num_steps in range(2, 80):
        for fraction in (0.05, 0.1, 0.2, 0.33, 0.5, 1.0):
            count = min(num_steps - 1, max(1, round(fraction * num_steps)))
            _, steps = subsample_steps(200, num_steps, "stratified", fraction, g)
            steps = steps.reshape(200, -1)
            assert steps.shape[1] == count + 1, (num_steps, fraction)
            for j, (low, high) in enumerate(exact_strata(num_steps, count)):
                column = steps[:, j]
                assert ((column >= low) & (column < high)).all(), (num_steps, fraction, j, low, high)


def test_all_and_uniform_subsampling():
    g = torch.Generator().manual_seed(2)
    rows, steps = subsample_steps(7, 12, "all", 0.1, g)
    assert torch.equal(steps.reshape(7, 12), torch.arange(12).expand(7, -1))
    assert torch.equal(rows.reshape(7, 12), torch.arange(7)[:, None].expand(7, 12))

    rows, steps = subsample_steps(2000, 20, "uniform", 0.2, g)  # 4 distinct steps + the last
    steps = steps.reshape(2000, 5)
    chosen = steps[:, :4]
    assert (steps[:, -1] == 19).all()
    assert ((chosen >= 0) & (chosen <= 18)).all()
    assert all(len(set(r)) == 4 for r in chosen.tolist())
    freq = torch.bincount(chosen.reshape(-1), minlength=19).double() / chosen.numel()
    assert (freq - 1 / 19).abs().max() < 0.01

    # one-step samplers train on that step; unknown kinds are refused
    assert subsample_steps(3, 1, "stratified", 0.1, g)[1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        subsample_steps(3, 10, "bogus", 0.1, g)


def test_subsampling_is_reproducible_from_the_generator():
    a = subsample_steps(50, 50, "stratified", 0.1, torch.Generator().manual_seed(3))
    b = subsample_steps(50, 50, "stratified", 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_make_transitions_picks_consecutive_states():
    run = build_run()
    batch, trajectories, rows, steps = make_batch(run, 8, kind="stratified", fraction=0.3)
    assert torch.equal(batch.state, trajectories.states[rows, steps])
    assert torch.equal(batch.next_state, trajectories.states[rows, steps + 1])
    assert torch.equal(batch.behaviour_eps, trajectories.eps[rows, steps])
    assert torch.equal(batch.final_state, trajectories.states[:, -1])
    assert batch.size == rows.shape[0]
    # recorded log-probs are those of the kernel at the recorded mean
    i = 3
    mean = run.kernel.mean(trajectories.states[:, i], trajectories.eps[:, i], torch.full((8,), i))
    torch.testing.assert_close(trajectories.log_probs[:, i],
                               run.kernel.log_prob(trajectories.states[:, i + 1], mean, torch.full((8,), i)))


# -- residual ∇-DB --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse_target", ["propagated", "expected", "sampled"])
@pytest.mark.parametrize("weighting", [("eps", "score"), ("score", "variance")])
def test_identity_loss_is_zero_for_pretrained_policy_and_constant_reward(reverse_target, weighting):
    """With R ≡ const and η = 1 the target is the pretrained model: a fresh run (zero residual, zero g_φ) is optimal."""
    run = build_run("reward.kind=linear", "reward.direction=[0.0, 0.0]", f"method.reverse_target={reverse_target}",
                    f"method.forward_weighting={weighting[0]}", f"method.reverse_weighting={weighting[1]}")
    batch, *_ = make_batch(run, 16, kind="all")
    loss, metrics = run.method.loss(batch, torch.Generator().manual_seed(0))
    assert loss.requires_grad
    assert abs(loss.item()) < 1e-12
    for key in ("loss/forward", "loss/reverse", "loss/terminal", "loss/output_reg"):
        assert abs(metrics[key]) < 1e-12, key


@pytest.mark.parametrize("reverse_target", ["propagated", "expected", "sampled"])
def test_loss_with_informative_reward_trains_policy_and_flow(reverse_target):
    run = build_run("reward.kind=gaussian", f"method.reverse_target={reverse_target}")
    batch, *_ = make_batch(run, 16, kind="stratified", fraction=0.3)
    loss, metrics = run.method.loss(batch, torch.Generator().manual_seed(0))
    assert loss.item() > 1e-3
    assert metrics["loss/forward"] > 0 and metrics["loss/reverse"] > 0
    loss.backward()
    policy = run.backend.trainable_parameters()
    flow = list(run.method.networks["flow_score"].parameters())
    assert grad_norms(policy) > 0
    assert grad_norms(flow) > 0
    assert all(torch.isfinite(p.grad).all() for p in policy + flow if p.grad is not None)
    assert set(run.method.parameter_groups()) == {"policy", "flow"}


def test_forward_loss_pushes_policy_toward_reward():
    """One gradient step on the residual moves the policy's ε so that the next state's mean moves up the reward."""
    run = build_run("reward.kind=linear", "reward.direction=[1.0, 0.0]", "method.weight_reverse=0",
                    "method.weight_terminal=0")
    batch, *_ = make_batch(run, 32, kind="all")
    loss, _ = run.method.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    with torch.no_grad():
        for p in run.backend.trainable_parameters():
            p -= 1e-3 * p.grad
    # μ_θ − μ# = b (ε_θ − ε#) should now point along +x (b < 0 for every step, so ε moves along −x)
    timestep = run.kernel.timestep_of_state(batch.step)
    residual = run.backend.residual(batch.state, timestep)
    delta_mean = run.kernel.eps_coef.float()[batch.step, None] * residual
    assert delta_mean[:, 0].mean() > 0
    assert delta_mean[:, 0].mean() > 3 * delta_mean[:, 1].abs().mean()


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_expected_reverse_target_is_conditional_mean_of_sampled(eta):
    run = build_run("reward.kind=gaussian", "method.reverse_target=sampled", f"method.prior_strength={eta}")
    method, kernel, backend = run.method, run.kernel, run.backend
    with torch.no_grad():  # μ_θ ≠ μ#
        gen = torch.Generator().manual_seed(5)
        for p in backend.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    n = 20000
    step_index = 5
    x = torch.tensor([[1.2, -0.7]]).repeat(n, 1)
    step = torch.full((n,), step_index, dtype=torch.long)
    cond = torch.zeros(n, dtype=torch.long)
    t = kernel.timestep_of_state(step)
    with torch.no_grad():
        mean_policy = kernel.mean(x, backend.eps(x, t, cond, finetuned=True), step)
        mean_pretrained = kernel.mean(x, backend.eps(x, t, cond, finetuned=False), step)
    assert (mean_policy - mean_pretrained).abs().max() > 0.05 * float(kernel.std[step_index])
    x_next = mean_policy + kernel.std_like(x, step) * torch.randn(x.shape, generator=gen)

    # the forward condition's optimum: ∇ log F̃(x_{k+1}) = η(μ_θ − μ#)/σ² − (1 − η) ∇_{x_{k+1}} log P_B at μ_θ,
    # in expectation
    backward_next, backward_here = method.noising.scores(x, mean_policy, step)
    next_flow = eta * (mean_policy - mean_pretrained) / kernel.variance_like(x, step) - (1 - eta) * backward_next
    pretrained = PretrainedEps(backend, kernel, x, step, cond, with_graph=True)
    assert torch.equal(pretrained.mean, mean_pretrained)
    args = (x, x_next, step, cond, mean_policy, pretrained, next_flow)
    sampled = method.reverse_residual_policy_score(*args).double()
    method.config.reverse_target = "expected"
    expected = method.reverse_residual_policy_score(*args).double()
    method.config.reverse_target = "propagated"
    propagated = method.reverse_residual_policy_score(*args).double()
    # propagated = expected once eq. 16 holds (Remark 6: substitute the forward condition into eq. 17)
    assert torch.allclose(propagated, expected, atol=1e-5)
    assert torch.allclose(expected, expected[:1].expand_as(expected), atol=1e-5)  # no dependence on x_next

    mc_mean = sampled.mean(0)
    mc_error = sampled.std(0) / n**0.5
    assert ((mc_mean - expected[0]).abs() < 5 * mc_error + 1e-5).all(), (mc_mean, expected[0], mc_error)
    assert expected[0].abs().max() > 20 * mc_error.max()  # the comparison can tell a wrong answer apart
    # closed form −η J#ᵀ(μ_θ − μ#)/σ² − (1 − η) ∇_{x_k} log P_B(x_k | μ_θ), J# from autograd of the pretrained mean
    x0 = x[:1].clone().requires_grad_()
    mean0 = kernel.mean(x0, backend.eps(x0, t[:1], cond[:1], finetuned=False), step[:1])
    jac = torch.stack([torch.autograd.grad(mean0[0, i], x0, retain_graph=True)[0][0] for i in range(2)])
    closed = -eta * jac.T @ ((mean_policy[0] - mean_pretrained[0]) / kernel.std[step_index] ** 2).float()
    closed = closed - (1 - eta) * backward_here[0]
    torch.testing.assert_close(expected[0].float(), closed, rtol=1e-4, atol=1e-5)


def test_second_order_keeps_graph_for_the_policy():
    run = build_run("reward.kind=gaussian", "method.reverse_target=sampled", "method.second_order=true",
                    "method.weight_forward=0", "method.weight_terminal=0")
    with torch.no_grad():
        for p in run.backend.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    batch, *_ = make_batch(run, 8, kind="stratified", fraction=0.3)
    loss, _ = run.method.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    # only the reverse loss is on, and it reaches the policy through the second-order term
    assert grad_norms(run.backend.trainable_parameters()) > 0


# -- ∇-DB (no prior) ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse_target", ["expected", "sampled"])
@pytest.mark.parametrize("weighting", [("eps", "score"), ("score", "variance")])
def test_nabla_db_loss_runs_and_is_differentiable(reverse_target, weighting):
    run = build_run("method.name=nabla_db", f"method.reverse_target={reverse_target}",
                    f"method.forward_weighting={weighting[0]}", f"method.reverse_weighting={weighting[1]}")
    batch, *_ = make_batch(run, 8, kind="stratified", fraction=0.3)
    loss, metrics = run.method.loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() > 0
    assert set(metrics) >= {"loss/forward", "loss/reverse", "loss/terminal"}
    loss.backward()
    assert grad_norms(run.backend.trainable_parameters()) > 0
    assert grad_norms(run.method.networks["flow_score"].parameters()) > 0


# -- reward requirements -------------------------------------------------------------------------------------------
class StepReward(Reward):
    differentiable = False

    def log_reward(self, y, cond):
        return (y[:, 0] > 0).float()


@pytest.mark.parametrize("name", ["residual_nabla_db", "nabla_db"])
def test_gradient_methods_refuse_non_differentiable_rewards(name):
    run = build_run(f"method.name={name}")
    with pytest.raises(ValueError, match="differentiable"):
        build_method(run.config.method, run.backend, StepReward(), run.kernel)
    # the same reward flagged differentiable is accepted
    accepted = StepReward()
    accepted.differentiable = True
    assert isinstance(build_method(run.config.method, run.backend, accepted, run.kernel), ResidualNablaDB)


class _SineReward(Reward):
    """log R(y) = Σ sin(w·y): its Gaussian smoothing has a closed form, sin(w y) e^{−w² c² / 2}."""

    def __init__(self, frequency: float):
        super().__init__()
        self.frequency = frequency

    def log_reward(self, y, cond):
        return torch.sin(self.frequency * y).sum(-1)


def test_reward_smoothing_matches_the_closed_form():
    noise, frequency, samples = 0.4, 3.0, 10000  # Monte-Carlo error ≈ 3/√(2·10000) ≈ 0.02
    run = build_run("method.reward_smoothing.noise=0.4", f"method.reward_smoothing.samples={samples}")
    method = run.method
    method.reward = _SineReward(frequency)
    x = torch.tensor([[0.3, -1.1], [2.0, 0.5]])
    final = torch.full((2,), run.kernel.num_steps)  # final states: x̂ = x, so the gradient is the reward's own
    grad = method.predicted_log_reward_grad(x, final, torch.zeros(2, dtype=torch.long), torch.Generator().manual_seed(0))
    expected = frequency * torch.cos(frequency * x) * torch.exp(torch.tensor(-(frequency**2) * noise**2 / 2))
    torch.testing.assert_close(grad, expected, atol=0.09, rtol=0)
    unsmoothed = frequency * torch.cos(frequency * x)
    assert (grad - unsmoothed).abs().max() > 0.3  # the smoothing is really applied


PIECES = {  # method → (its overrides, the transitions of a minibatch of 16 trajectories)
    "residual_nabla_db": (["method.subsample.fraction=0.3", "method.beta=2.0"], 16 * 4),
    "nabla_db": (["method.beta=2.0"], 16 * 2),
    "ddpo": (["method.clip_range=0.5", "method.per_prompt=false", "train.on_policy=true"], 16 * 10),
    "flow_grpo": (["model.parameterization=flow", "method.group_size=4", "method.clip_range=0.5",
                   "method.kl_weight=0.1", "train.on_policy=true"], 16 * 10),
}


@pytest.mark.parametrize("method", list(PIECES))
def test_backpropagating_in_pieces_gives_the_same_update_with_smaller_model_batches(tmp_path, method):
    """``method.transitions_per_backward=7``: the minibatch's transitions go through the policy 7 at a time, each piece
    backpropagated before the next, and the update's gradients and metrics are those of the whole minibatch."""
    overrides, transitions = PIECES[method]
    results = {}
    for pieces in (None, 7):
        config = load_config(None, [*FAST, f"method.name={method}", *overrides, "train.trajectories_per_epoch=16",
                                    "train.batch_size=16"]
                             + ([f"method.transitions_per_backward={pieces}"] if pieces else []))
        trainer = Trainer.from_config(config, tmp_path / str(pieces), progress=False)
        trainer.update()  # the second update has a finetuned policy away from the pretrained one
        batches, eps = [], trainer.run.backend.eps

        def recording_eps(x, *args, _eps=eps, _batches=batches, **kwargs):
            if kwargs.get("finetuned", True) and torch.is_grad_enabled():
                _batches.append(len(x))
            return _eps(x, *args, **kwargs)

        trainer.run.backend.eps = recording_eps
        metrics = trainer.update()
        trainer.run.backend.eps = eps
        gradients = [p.grad.clone() for group in trainer.parameter_groups.values() for p in group if p.grad is not None]
        results[pieces] = metrics, gradients, batches
    (whole, whole_gradients, whole_batches), (split, split_gradients, split_batches) = results[None], results[7]
    assert whole_batches == [transitions]
    assert split_batches == [7] * (transitions // 7) + ([transitions % 7] if transitions % 7 else [])
    assert len(split_gradients) == len(whole_gradients) > 0
    scale = max(g.abs().max() for g in whole_gradients)
    for split_gradient, whole_gradient in zip(split_gradients, whole_gradients, strict=True):
        torch.testing.assert_close(split_gradient, whole_gradient, rtol=1e-4, atol=1e-5 * scale)
    assert split.keys() <= whole.keys()
    for key, value in split.items():
        assert value == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
