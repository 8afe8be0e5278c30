"""benchmarks/memory_precision.py: its options, its table, and one configuration measured in-process on the tiny
pipeline (the structure of the measurement and the exact weight sizes, never a peak's value)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from tiny_sd import save_tiny_sd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_precision  # noqa: E402
from method_costs import machine  # noqa: E402


def test_options_and_configurations():
    args = memory_precision.parse_args([])
    assert args.methods == ["residual_nabla_db", "draft", "refl"] and args.dtypes == ["fp32", "bf16"]
    assert args.latent_size == 16 and args.device == "cpu" and args.out is None and args.child is None
    child = memory_precision.parse_args(["--child", '{"method": "refl", "dtype": "bf16", "gradient_checkpointing": true}'])
    assert child.child == {"method": "refl", "dtype": "bf16", "gradient_checkpointing": True}
    with pytest.raises(SystemExit):
        memory_precision.parse_args(["--dtypes", "int8"])
    configs = memory_precision.configurations(["residual_nabla_db", "refl"], ["fp32", "bf16"])
    assert [(c["method"], c["dtype"], c["gradient_checkpointing"]) for c in configs[:4]] == [
        ("residual_nabla_db", "fp32", False), ("residual_nabla_db", "fp32", True),
        ("residual_nabla_db", "bf16", False), ("residual_nabla_db", "bf16", True)]
    assert len(configs) == 8


def row(dtype: str, checkpointing: bool, peak: float, seconds: list[float]) -> dict:
    return {"method": "refl", "dtype": dtype, "gradient_checkpointing": checkpointing, "base_weights_mb": 1.0,
            "trainable_mb": 0.5, "run_built_mb": 200.0, "sampling_peak_mb": 10.0, "update_peak_mb": peak,
            "update_s": seconds}


def test_ratios_are_to_the_methods_fp32_row_without_checkpointing():
    rows = memory_precision.add_ratios([row("fp32", False, 80.0, [1.0, 3.0]), row("bf16", True, 20.0, [4.0, 6.0])])
    assert [r["peak_ratio"] for r in rows] == [1.0, 0.25]
    assert [r["time_ratio"] for r in rows] == [1.0, 2.5]
    assert math.isnan(memory_precision.add_ratios([row("bf16", False, 20.0, [1.0])])[0]["peak_ratio"])
    text = memory_precision.markdown({"command": "x", "machine": {**machine("cpu"), "load_average_end": None},
                                      "latent_size": 16, "settings": ["reward.kind=brightness"], "how": "RSS",
                                      "rows": rows})
    assert "4×16×16 latents" in text and "torch" in text
    assert "| refl | bf16 | on | 1.00 | 0.50 | 200.0 | 10.0 | 20.0 | 0.25 | 5.00 | 2.50 |" in text


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="CPU peaks need Linux's /proc")
def test_one_configuration_in_process(tmp_path):
    pipeline = str(save_tiny_sd(tmp_path / "pipeline"))
    extra = ["sampler.steps=2", "train.trajectories_per_epoch=4", "train.batch_size=2"]  # 2 updates per epoch
    results = {dtype: memory_precision.measure(
        {"method": "residual_nabla_db", "dtype": dtype, "gradient_checkpointing": True}, pipeline, "cpu", extra)
        for dtype in ("fp32", "bf16")}
    for result in results.values():
        assert len(result["update_peaks_mb"]) == len(result["update_s"]) == len(result["losses"]) == 2
        assert result["update_peak_mb"] == max(result["update_peaks_mb"])
        assert all(math.isfinite(value) for value in result["losses"])
        assert result["gradient_checkpointing"] and result["method"] == "residual_nabla_db"
    # bf16 halves the frozen weights exactly; the trainable ones (LoRA, g_φ) stay fp32
    assert results["bf16"]["base_weights_mb"] == pytest.approx(results["fp32"]["base_weights_mb"] / 2, rel=1e-12)
    assert results["bf16"]["trainable_mb"] == results["fp32"]["trainable_mb"] > 0
