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


@pytest.fixture
def small_run_overrides() -> list[str]:
    return list(SMALL_RUN)
