"""benchmarks/sd_memory.py: the fake-tensor estimate of an update's peak memory against the same update on real
tensors (the tiny pipeline; sizes only, never timings)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from tiny_sd import save_tiny_sd
from tiny_sd3 import save_tiny_sd3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sd_memory  # noqa: E402

pytest.importorskip("peft")


def cell(sd_path: Path, real: bool, model: str = "sd15") -> dict:
    args = argparse.Namespace(child=["residual_nabla_db", "fp32", "off"], real=real, sd_path=sd_path, steps=2,
                              reward="brightness", batch_sizes=[1, 2], override=["model.flow_channels=[8,16]"],
                              model=model)
    torch.manual_seed(0)
    return sd_memory.measure_cell(args)


@pytest.mark.parametrize("model", ["sd15", "sd3"])
def test_estimate_on_fake_tensors_matches_the_real_update(tmp_path, model):
    sd_path = (save_tiny_sd3 if model == "sd3" else save_tiny_sd)(tmp_path / "pipeline")
    fake, real = cell(sd_path, real=False, model=model), cell(sd_path, real=True, model=model)
    assert fake["sampling"]["resident_gb"] == real["sampling"]["resident_gb"] > 0  # the same weights and buffers
    for estimated, measured in zip(fake["rows"], real["rows"], strict=True):
        assert estimated["batch"] == measured["batch"]
        assert measured["update_peak_gb"] > measured["resident_gb"]
        assert estimated["update_peak_gb"] == pytest.approx(measured["update_peak_gb"], rel=0.05)
    # more trajectories per update, more activations at the peak
    assert fake["rows"][1]["update_peak_gb"] > fake["rows"][0]["update_peak_gb"]


def test_largest_batch_from_a_line_through_the_peaks():
    rows = [{"batch": 1, "update_peak_gb": 10.0}, {"batch": 4, "update_peak_gb": 16.0}]  # 8 GB + 2 GB per trajectory
    assert [sd_memory.largest_batch(rows, budget, reserve_gb=0) for budget in (9, 24, 40, 80)] == [None, 8, 16, 36]
    assert sd_memory.largest_batch(rows, 24, reserve_gb=1) == 7
