"""Shared test settings: offline, single-threaded, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state (tests also use their own generators)."""
    torch.manual_seed(0)
    yield


# Small, fast run settings shared by the tests that build a whole run.
SMALL_RUN = (
    "model.kind=gmm",
    "sampler.steps=10",
    "model.hidden=32",
    "model.layers=2",
    "train.trajectories_per_epoch=32",
    "train.batch_size=16",
    "train.eval_samples=100",
)
# … with 2 updates per epoch (minibatches of 8, 2 per update) and every update logged: resume, faults, processes
TWO_UPDATES_PER_EPOCH = (
    *(item for item in SMALL_RUN if not item.startswith("train.batch_size")),
    "train.batch_size=8",
    "train.accumulation=2",
    "train.log_every=1",
)


@pytest.fixture
def small_run_overrides() -> list[str]:
    return list(SMALL_RUN)


def check_noising_kernel(noising, x, x_next, step, coef, variance) -> None:
    """A noising kernel P_B(x | x_next) = N(coef·x_next, variance·I): its log-density (up to the normalising constant)
    against torch.distributions, and its scores (∇_{x_next}, ∇_x) against autograd."""
    from torch.distributions import Independent, Normal

    c, v = coef[:, None, None], variance[:, None, None]
    exact = Independent(Normal(c * x_next, v.sqrt().expand_as(x)), 2).log_prob(x)
    constant = -0.5 * x[0].numel() * torch.log(2 * torch.pi * variance)
    torch.testing.assert_close(noising.log_density(x, x_next, step) + constant, exact)
    x_in, next_in = x.clone().requires_grad_(), x_next.clone().requires_grad_()
    grad_here, grad_next = torch.autograd.grad(noising.log_density(x_in, next_in, step).sum(), (x_in, next_in))
    score_next, score_here = noising.scores(x, x_next, step)
    torch.testing.assert_close(score_next, grad_next)
    torch.testing.assert_close(score_here, grad_here)


class Interrupted(Exception):
    """Raised by ``interrupt_after``: a simulated crash."""


def interrupt_after(trainer, update: int) -> None:
    """Simulate a crash right after the training record of ``update`` is logged (the trainer has no stop hook).

    Everything the trainer did after its last checkpoint (weights, optimiser moments, RNG draws, log lines)
    must then be discarded or replayed by the resumed run."""
    log = trainer._log

    def log_then_maybe_stop(record):
        log(record)
        if record.get("update") == update and "loss" in record:
            raise Interrupted

    trainer._log = log_then_maybe_stop
