"""Rollouts record what the methods need: states, timesteps, conditioning, behaviour ε and log-probs."""

import torch

from nablagfn.config_loading import load_config
from nablagfn.mdp import rollout
from nablagfn.train.run import Run


def test_recorded_trajectory_is_consistent_with_the_kernel():
    run = Run.build(load_config(None, ["model.kind=gmm", "sampler.steps=12", "model.hidden=16"]))
    with torch.no_grad():  # a non-trivial finetuned policy
        for p in run.backend.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    generator = torch.Generator().manual_seed(0)
    cond = run.backend.sample_conditions(7, generator)
    traj = rollout(run.backend, run.kernel, cond, generator)
    K = run.kernel.num_steps
    assert traj.states.shape == (7, K + 1, 2) and traj.eps.shape == (7, K, 2) and traj.log_probs.shape == (7, K)
    assert torch.equal(traj.timesteps[0], run.kernel.state_timesteps) and traj.timesteps[0, -1] == 0
    assert torch.equal(traj.cond, cond)
    for k in range(K):
        step = torch.full((7,), k)
        t = traj.timesteps[:, k]
        eps = run.backend.eps(traj.states[:, k], t, cond, finetuned=True)
        torch.testing.assert_close(traj.eps[:, k], eps)
        mean = run.kernel.mean(traj.states[:, k], eps, step)
        torch.testing.assert_close(traj.log_probs[:, k], run.kernel.log_prob(traj.states[:, k + 1], mean, step))
    # the same seed gives the same final states, which are what record=False returns
    generator = torch.Generator().manual_seed(0)
    run.backend.sample_conditions(7, generator)
    finals = rollout(run.backend, run.kernel, cond, generator, record=False)
    torch.testing.assert_close(finals, traj.final)
