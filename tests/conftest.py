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
