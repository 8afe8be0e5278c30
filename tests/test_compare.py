"""`nablagfn compare`: a methods × seeds grid on the Gaussian mixture, its report, resumption and early errors."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
from conftest import SMALL_RUN

from nablagfn.cli import main
from nablagfn.compare import load_settings, plan_grid

GRID = ["--methods", "residual_nabla_db", "ddpo", "--seeds", "0", "1"]
OVERRIDES = [*SMALL_RUN, "train.updates=2", "train.eval_every=1"]
REPORT = ("results.md", "summary.json", "curves.png", "pareto.png", "grids.png")
PNG = b"\x89PNG\r\n\x1a\n"


def _compare(out: Path, *extra: str) -> int:
    return main(["compare", "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "report"
    assert _compare(out, *GRID, *OVERRIDES) == 0
    return out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _best(run_dir: Path) -> dict:
    """The evaluation after update 0 with the highest mean log-reward, recomputed from metrics.jsonl."""
    evaluations = [r for r in _records(run_dir) if "eval/log_reward_mean" in r and r["update"] > 0]
    return max(evaluations, key=lambda r: r["eval/log_reward_mean"])


def _table(results_md: str) -> dict[str, dict[str, str]]:
    """Table 1 of results.md as {row name: {column title: cell}}."""
    lines = results_md.split("## Table 1")[1].split("\n\n")[1].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(header, cells))
    return rows


def test_grid_writes_every_report_file(report):
    runs = sorted(p.name for p in (report / "runs").iterdir())
    assert runs == ["ddpo_seed0", "ddpo_seed1", "residual_nabla_db_seed0", "residual_nabla_db_seed1"]
    for run in runs:  # ordinary run directories, finished
        config = (report / "runs" / run / "config.yaml").read_text()
        assert f"seed: {run[-1]}" in config and f"name: {run.rsplit('_seed', 1)[0]}" in config
        assert (report / "runs" / run / "checkpoints" / "update_0000002" / "model.safetensors").is_file()
        assert [r["update"] for r in _records(report / "runs" / run) if "eval/log_reward_mean" in r] == [0, 1, 2]
    for name in REPORT:
        assert (report / name).stat().st_size > 500, name
        if name.endswith(".png"):
            assert (report / name).read_bytes()[:8] == PNG
    text = (report / "results.md").read_text()
    assert "nablagfn compare --methods residual_nabla_db ddpo --seeds 0 1" in text  # the command, date, machine
    assert "- date: " in text and "torch " in text and "1 thread per run" in text
    assert set(_table(text)) == {"pretrained (update 0)", "residual_nabla_db", "ddpo"}  # one row per method


def test_table_is_mean_and_std_of_best_reward_evaluations(report):
    summary = json.loads((report / "summary.json").read_text())
    table = _table((report / "results.md").read_text())
    for method in ("residual_nabla_db", "ddpo"):
        best = [_best(report / "runs" / f"{method}_seed{seed}") for seed in (0, 1)]
        row = summary["methods"][method]
        assert row["seeds"] == [0, 1] and row["best_updates"] == [b["update"] for b in best]
        for key, column in (("eval/log_reward_mean", "reward (mean log R) ↑"),
                            ("eval/energy_distance", "energy distance to target ↓")):
            if method == "ddpo" and key == "eval/energy_distance":  # a reward maximiser has no exact target
                assert row["metrics"][key] is None and table[method][column] == "n/a"
                continue
            values = [b[key] for b in best]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert row["metrics"][key]["mean"] == pytest.approx(mean, rel=1e-12)
            assert row["metrics"][key]["std"] == pytest.approx(std, rel=1e-12)
            shown_mean, shown_std = (float(x) for x in table[method][column].split(" ± "))
            decimals = len(table[method][column].split(" ± ")[0].split(".")[1])
            assert shown_mean == pytest.approx(mean, abs=0.51 * 10**-decimals)
            assert shown_std == pytest.approx(std, abs=0.51 * 10**-decimals)
        times = [[r["time"] for r in _records(report / "runs" / f"{method}_seed{seed}") if "time" in r][-1]
                 for seed in (0, 1)]
        assert row["wall_time"]["mean"] == pytest.approx(statistics.fmean(times))
        assert table[method]["seeds"] == "2" and table[method]["updates"] == "2"
    # evaluations are placed in training wall time: update 1 has no training record (log_every=10), so it is
    # interpolated between update 0 (time 0) and update 2
    run = next(r for r in summary["runs"] if r["method"] == "ddpo" and r["seed"] == 0)
    assert [e["update"] for e in run["evaluations"]] == [0, 1, 2]
    assert run["evaluations"][1]["time"] == pytest.approx(run["evaluations"][2]["time"] / 2)
    # and in the time spent in updates alone, which leaves out the evaluations at updates 0 and 1
    assert 0 < run["evaluations"][2]["update_time"] < run["evaluations"][2]["time"]
    # the mixture logs neither diversity nor FID: the report says so instead of showing a number
    assert summary["missing_metrics"][:2] == ["eval/diversity", "eval/fid_to_pretrained"]
    assert "**Missing:** no run's evaluations hold `eval/diversity`, `eval/fid_to_pretrained`" in (
        report / "results.md").read_text()
    assert "diversity ↑" not in table["ddpo"]


def test_changed_config_for_existing_runs_fails_before_training(report, capsys):
    before = (report / "runs" / "ddpo_seed0" / "metrics.jsonl").read_bytes()
    assert _compare(report, *GRID, *OVERRIDES, "train.updates=3") == 2
    error = capsys.readouterr().err
    assert "residual_nabla_db_seed0 holds a run with another config" in error and "train.updates: 2 → 3" in error
    assert (report / "runs" / "ddpo_seed0" / "metrics.jsonl").read_bytes() == before


def test_rerun_skips_finished_runs_and_report_only_rebuilds(report, capsys):
    runs = sorted((report / "runs").iterdir())
    before = {run: ((run / "metrics.jsonl").read_bytes(), (run / "metrics.jsonl").stat().st_mtime_ns,
                    sorted(p.name for p in (run / "checkpoints").iterdir())) for run in runs}
    summary = json.loads((report / "summary.json").read_text())
    capsys.readouterr()
    assert _compare(report, *GRID, *OVERRIDES) == 0
    assert capsys.readouterr().out.count("skipped (finished)") == 4
    for run in runs:  # no new training: metrics and checkpoints untouched
        after = ((run / "metrics.jsonl").read_bytes(), (run / "metrics.jsonl").stat().st_mtime_ns,
                 sorted(p.name for p in (run / "checkpoints").iterdir()))
        assert after == before[run]
    for name in REPORT:
        (report / name).unlink()
    assert _compare(report, "--report-only") == 0
    assert all((report / name).is_file() for name in REPORT)
    rebuilt = json.loads((report / "summary.json").read_text())
    assert rebuilt["methods"] == summary["methods"] and rebuilt["pretrained"] == summary["pretrained"]
    text = (report / "results.md").read_text()
    assert "nablagfn compare --methods residual_nabla_db ddpo" in text and "--report-only" in text
    for run in runs:
        assert (run / "metrics.jsonl").read_bytes() == before[run][0]


def test_unfinished_run_is_resumed(tmp_path, capsys):
    args = ["--methods", "graft", "--seeds", "3", *OVERRIDES, "train.checkpoint_every=1"]
    assert _compare(tmp_path, *args) == 0
    run = tmp_path / "runs" / "graft_seed3"
    evaluations = [r for r in _records(run) if "eval/log_reward_mean" in r]
    shutil.rmtree(run / "checkpoints" / "update_0000002")  # as if killed after update 1
    capsys.readouterr()
    assert _compare(tmp_path, *args) == 0
    assert "graft_seed3: resumed" in capsys.readouterr().out
    assert [r for r in _records(run) if "eval/log_reward_mean" in r] == evaluations  # continued exactly
    assert (run / "checkpoints" / "update_0000002").is_dir()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "residual_nabla_db", "dpo"], "unknown method 'dpo'"),
        (["--methods", ","], "empty grid"),
        (["--methods", "ddpo", "method.clip_rang=0.1"], "method.clip_rang: unknown key"),
        (["--methods", "residual_nabla_db", "ddpo", "method.clip_range=0.1"],
         "method residual_nabla_db: invalid config:\n  method.clip_range: unknown key"),
        (["--methods", "ddpo", "train.seed=4"], "compare sets train.seed"),
        (["--seeds", "0", "x"], "--seeds takes integers"),
    ],
)
def test_bad_grid_fails_before_any_run(tmp_path, capsys, args, message):
    out = tmp_path / "report"
    assert _compare(out, *args, *OVERRIDES) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was started


def test_reward_without_gradients_fails_before_any_run(tmp_path, capsys):
    out = tmp_path / "report"
    assert _compare(out, "--methods", "graft", "refl", "reward.kind=jpeg_compressibility") == 2  # digits model
    error = capsys.readouterr().err
    assert "method refl: invalid config:\n  method.name: refl needs reward gradients" in error
    assert "method graft" not in error and "graft, refl" not in error and not out.exists()  # only refl fails


def test_a_failing_run_leaves_the_others_and_the_report(tmp_path, capsys):
    # Adjoint Matching refuses a sampler that is not memoryless when its run is built: that run fails alone
    assert _compare(tmp_path, "--methods", "adjoint_matching", "graft", "--seeds", "0", *OVERRIDES,
                    "sampler.kind=ddim", "sampler.eta=0.5") == 1
    output = capsys.readouterr().out
    assert "adjoint_matching_seed0: failed" in output and "needs a memoryless sampler" in output
    assert "graft_seed0: trained" in output and "Traceback" not in output  # a clear message, no traceback
    text = (tmp_path / "results.md").read_text()
    assert "adjoint_matching_seed0: failed: invalid config: method.name: adjoint_matching needs" in text
    assert _table(text)["graft"]["seeds"] == "1" and _table(text)["adjoint_matching"]["seeds"] == "0 of 1"


def test_settings_file_errors_and_precedence(tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text("ddpo: [method.clip_range=0.01]\nrefl: [method.bogus=1]\n")
    out = tmp_path / "report"
    assert _compare(out, "--methods", "ddpo", "refl", "--settings", str(settings), *OVERRIDES) == 2
    assert "method refl: invalid config:\n  method.bogus: unknown key" in capsys.readouterr().err
    settings.write_text("dpo: []\n")
    assert _compare(out, "--methods", "ddpo", "--settings", str(settings), *OVERRIDES) == 2
    assert "unknown method 'dpo'" in capsys.readouterr().err
    assert not out.exists()
    # per-method settings win over the command line's overrides; other methods keep the override
    specs = plan_grid(["ddpo", "refl"], [0], out, None, [*OVERRIDES, "train.policy_optimizer.lr=5e-3"],
                      {"refl": ["train.policy_optimizer.lr=1e-3"]})
    assert [(s.method, s.seed, s.config.train.policy_optimizer.lr) for s in specs] == [("ddpo", 0, 5e-3),
                                                                                        ("refl", 0, 1e-3)]


def test_digits_settings_are_valid_for_every_method(tmp_path):
    path = Path(__file__).parents[1] / "configs" / "compare_digits.yaml"
    settings = load_settings(path)
    from nablagfn.methods import METHODS

    assert set(settings) == set(METHODS)
    specs = {s.method: s.config for s in plan_grid(list(METHODS), [0], tmp_path, None, [], settings)}
    assert all(config.model.kind == "digits" for config in specs.values())
    assert specs["ddpo"].train.on_policy and specs["ddpo"].method.clip_range > 1e-4
    assert specs["dag_db"].train.policy_optimizer.lr == 3e-4 and specs["dag_db"].train.flow_optimizer.lr == 3e-3
    assert specs["draft"].train.policy_optimizer.lr == specs["draft_lv"].train.policy_optimizer.lr == 3e-4
    assert specs["residual_db"].method.beta_ramp == 0 and specs["adjoint_matching"].train.on_policy


def test_time_to_reward_counts_the_seconds_in_updates_not_the_evaluations(report):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import method_costs

    from nablagfn.compare import discover_runs, read_run

    results = [read_run(spec) for spec in discover_runs(report)]
    best = max(results, key=lambda r: r.evaluations[-1]["eval/log_reward_mean"])
    level = best.evaluations[-1]["eval/log_reward_mean"]  # reached at the last update, after two evaluations
    first = next(e for e in best.evaluations if e["eval/log_reward_mean"] >= level)
    row = method_costs.time_to_reward(report, level)["rows"][best.method]
    assert first["update"] in row["updates"] and first["update_time"] in row["seconds"]
    if first["update"] > 0:
        assert first["update_time"] < first["time"]
