"""benchmarks/method_costs.py on a 2-step Gaussian mixture: the structure of its measurements (never their values)."""

from __future__ import annotations

import sys
from pathlib import Path

from nablagfn.config_loading import load_config
from nablagfn.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import method_costs  # noqa: E402

TINY = ["model.kind=gmm", "sampler.steps=2", "model.hidden=16", "model.layers=1", "train.trajectories_per_epoch=8",
        "train.batch_size=4"]


def trainer(tmp_path, method: str) -> Trainer:
    return Trainer.from_config(load_config(None, [*TINY, f"method.name={method}"]), tmp_path / method, progress=False)


def test_overhead_breakdown_parts_are_positive_and_the_reference_eps_is_evaluated_once(tmp_path):
    run = trainer(tmp_path, "residual_nabla_db")
    result = method_costs.measure_overhead(run, repeats=1, device="cpu")
    assert set(result["necessary"]) == {
        "policy ε_θ forward + backward", "reference ε# forward",
        "reward-gradient passes (look-ahead at x_k and x_{k+1})", "flow g_φ forward + backward", "rollout share",
    }
    assert all(seconds > 0 for seconds in result["necessary"].values())
    assert result["ratio"] > 0 and result["update_with_rollout_share_s"] > 0
    labels = [stage["stage"] for stage in result["stages"]]
    assert labels[0].startswith("ε_θ(x_k) forward") and "loss.backward() (policy and g_φ)" in labels
    # per loss: ε_θ(x_k), ε#(x_{k+1}) for the look-ahead, ε#(x_k) once (reference, reverse target and look-ahead)
    n = result["transitions"]
    assert n == 4 * 2  # 2 steps: both transitions of each trajectory
    assert [(c["model"], c["grad"], c["states"]) for c in result["eps_calls_per_loss"]] == [
        ("finetuned", True, n), ("pretrained", True, n), ("pretrained", True, n)]
    # the timing wrappers are gone afterwards
    assert "eps" not in vars(run.run.backend) and "flow_score" not in vars(run.run.method)


def test_costs_table_has_a_row_per_method(tmp_path):
    trainers = {name: trainer(tmp_path, name) for name in ("residual_nabla_db", "refl")}
    cost = method_costs.measure_costs(trainers, repeats=1, device="cpu")
    assert cost["reference"] == "residual_nabla_db" and set(cost["rows"]) == set(trainers)
    assert cost["rows"]["residual_nabla_db"]["ratio_to_reference"] == 1.0
    assert cost["rows"]["refl"]["draws_own_chains"] and cost["rows"]["residual_nabla_db"]["updates_per_epoch"] == 2
    assert all(row["per_update_s"] > 0 for row in cost["rows"].values())
    text = method_costs.markdown({"command": "x", "machine": method_costs.machine("cpu"), "cost": cost})
    assert "| refl |" in text and "torch" in text
