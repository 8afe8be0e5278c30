"""The report of ``nablagfn compare``: each run's evaluations read back from its ``metrics.jsonl``, Table 1
(``results.md``), ``summary.json`` and the figures of ``viz.py``. It never recomputes a metric."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config_loading import load_config
from ..errors import ConfigError
from ..files import atomic_write_text, strict_json
from ..methods import METHODS
from .grid import RunSpec, run_name, run_state


@dataclass(frozen=True)
class Metric:
    """A metric of the evaluations in ``metrics.jsonl`` that the report knows how to show."""

    key: str
    label: str
    higher_is_better: bool
    ground_truth: bool = False  # only where the target is known (digits with the classifier, the Gaussian mixture)

    @property
    def title(self) -> str:
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"


METRICS: tuple[Metric, ...] = (
    Metric("eval/log_reward_mean", "reward (mean log R)", True),
    Metric("eval/diversity", "diversity", True),
    Metric("eval/fid_to_pretrained", "FID to pretrained", False),
    Metric("eval/class_accuracy", "class accuracy", True, ground_truth=True),
    Metric("eval/fd_to_class", "FD to real class", False, ground_truth=True),
    Metric("eval/mode_tv", "mode TV to target", False, ground_truth=True),
    Metric("eval/energy_distance", "energy distance to target", False, ground_truth=True),
)
REWARD = METRICS[0].key
#: reference values some evaluations log beside the metrics (the same for every checkpoint of a run)
REFERENCES: dict[str, str] = {
    "eval/diversity_real_class": "diversity of the real digits of the class",
    "eval/mode_tv_floor": "two-sample floor of the mode TV",
    "eval/energy_distance_floor": "two-sample floor of the energy distance",
}
REPORT_FILES = ("results.md", "summary.json", "curves.png", "pareto.png", "grids.png")


# -- reading the runs ----------------------------------------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class RunResult:
    """A run's evaluations read back from its ``metrics.jsonl``, each placed in training wall time."""

    method: str
    seed: int
    run_dir: Path
    updates: int  # planned (train.updates)
    state: str  # finished / partial / diverged / new (see run_state)
    #: update, time (s), update_time (s in updates alone, where logged) and the eval/... metrics, in update order
    evaluations: list[dict[str, float]]
    wall_time: float | None  # training wall time of the last logged update (the trainer's `time`)
    last_update: int  # last update with a training record
    note: str = ""

    @property
    def best(self) -> dict[str, float] | None:
        """The evaluation with the highest mean log-reward after training started (update > 0), or None."""
        candidates = [e for e in self.evaluations if e["update"] > 0 and _finite(e.get(REWARD))]
        return max(candidates, key=lambda e: e[REWARD]) if candidates else None

    @property
    def pretrained(self) -> dict[str, float] | None:
        """The evaluation at update 0: the pretrained model (every adapter starts as the identity)."""
        return next((e for e in self.evaluations if e["update"] == 0), None)


def _interpolate(points: list[tuple[int, float]], update: int) -> float:
    """Wall time at ``update``, linear between the training records' (update, time) points."""
    for (u0, t0), (u1, t1) in zip(points, points[1:]):
        if u0 <= update <= u1:
            return t0 if u1 == u0 else t0 + (t1 - t0) * (update - u0) / (u1 - u0)
    return points[-1][1]


def read_run(spec: RunSpec) -> RunResult:
    """The evaluations of a run directory (an empty list when it has not started)."""
    records = []
    path = spec.run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    times = sorted({(0, 0.0), *((r["update"], r["time"]) for r in records if "time" in r)})
    update_times = sorted({(0, 0.0), *((r["update"], r["update_time"]) for r in records if "update_time" in r)})
    evaluations = []
    for record in records:
        if not any(key.startswith("eval/") for key in record):
            continue
        evaluation = {key: value for key, value in record.items() if key.startswith("eval/")}
        placed = {"update": record["update"], "time": _interpolate(times, record["update"])}
        if len(update_times) > 1:
            placed["update_time"] = _interpolate(update_times, record["update"])
        evaluations.append({**placed, **evaluation})
    evaluations.sort(key=lambda e: e["update"])
    state = run_state(spec.run_dir, spec.config.train.updates)
    note = ""
    if state == "diverged":
        diverged = json.loads((spec.run_dir / "diverged.json").read_text())
        note = f"diverged (non-finite loss) at update {diverged['update']}"
    elif state in ("partial", "new") and records:
        note = f"unfinished: update {times[-1][0]} of {spec.config.train.updates}"
    elif state == "new":
        note = "not started"
    return RunResult(spec.method, spec.seed, spec.run_dir, spec.config.train.updates, state, evaluations,
                     times[-1][1] if len(times) > 1 else None, times[-1][0], note)


def discover_runs(out: Path, methods: list[str] | None = None, seeds: list[int] | None = None) -> list[RunSpec]:
    """The run directories under ``out/runs`` (for ``--report-only``), in the grid's method order, then by seed."""
    order = list(METHODS)
    grid = out / "compare.json"
    if grid.is_file():
        listed = json.loads(grid.read_text()).get("methods", [])
        order = [*listed, *(m for m in order if m not in listed)]
    specs = []
    for config_path in sorted((out / "runs").glob("*/config.yaml")):
        config = load_config(config_path)
        specs.append(RunSpec(config.method.name, config.train.seed, config, config_path.parent))
    specs = [s for s in specs if (methods is None or s.method in methods) and (seeds is None or s.seed in seeds)]
    if not specs:
        raise ConfigError(f"no runs to report under {out / 'runs'} (a run directory holds config.yaml)")
    return sorted(specs, key=lambda s: (order.index(s.method), s.seed))


# -- summarising ---------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict[str, Any] | None:
    """Mean and sample standard deviation (n − 1; None for one value) of the finite values; None when none."""
    values = [v for v in values if _finite(v)]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def present_metrics(results: list[RunResult]) -> tuple[list[Metric], list[Metric]]:
    """(metrics some run's evaluations hold, metrics none holds)."""
    keys = {key for result in results for evaluation in result.evaluations for key in evaluation}
    return [m for m in METRICS if m.key in keys], [m for m in METRICS if m.key not in keys]


def summarize(results: list[RunResult]) -> dict[str, Any]:
    """Per method, mean ± std over seeds of every present metric at each run's best-reward evaluation; the
    pretrained model's (update 0) values; and each run's best and final evaluations."""
    present, missing = present_metrics(results)
    methods = list(dict.fromkeys(result.method for result in results))
    summary: dict[str, Any] = {
        "selection": "each run's evaluation with the highest eval/log_reward_mean after update 0",
        "std": "sample standard deviation over seeds (n − 1); null with one seed",
        "metrics": {m.key: {"label": m.label, "higher_is_better": m.higher_is_better} for m in present},
        "missing_metrics": [m.key for m in missing],
        "methods": {},
        "runs": [],
    }
    pretrained = [r.pretrained for r in results if r.pretrained is not None]
    summary["pretrained"] = {m.key: mean_std([p[m.key] for p in pretrained if m.key in p]) for m in present}
    references = {key: mean_std([e[key] for r in results for e in r.evaluations if key in e]) for key in REFERENCES}
    summary["references"] = {key: stat for key, stat in references.items() if stat is not None}
    for method in methods:
        runs = [r for r in results if r.method == method]
        best = [(r, r.best) for r in runs if r.best is not None]
        summary["methods"][method] = {
            "runs": len(runs),
            "seeds": [r.seed for r, _ in best],
            "updates": sorted({r.updates for r in runs}),
            "best_updates": [b["update"] for _, b in best],
            "wall_time": mean_std([r.wall_time for r, _ in best if r.wall_time is not None]),
            "metrics": {m.key: mean_std([b[m.key] for _, b in best if m.key in b]) for m in present},
        }
    for r in results:
        summary["runs"].append({
            "method": r.method, "seed": r.seed, "run_dir": str(r.run_dir), "state": r.state, "note": r.note,
            "updates": r.updates, "last_update": r.last_update, "wall_time": r.wall_time, "best": r.best,
            "final": r.evaluations[-1] if r.evaluations else None, "evaluations": r.evaluations,
        })
    return summary


def _decimals(value: float) -> int:
    magnitude = abs(value)
    return 3 if magnitude < 10 else 2 if magnitude < 100 else 1


def format_stat(stat: dict[str, Any] | None, of: int | None = None, decimals: int | None = None) -> str:
    """``mean ± std`` (both with ``decimals``, default by the mean's size); ``n/a`` when there is no value;
    ``(n of N)`` when fewer seeds than ``of`` have a value."""
    if stat is None:
        return "n/a"
    decimals = _decimals(stat["mean"]) if decimals is None else decimals
    text = f"{stat['mean']:.{decimals}f}"
    if stat["std"] is not None:
        text += f" ± {stat['std']:.{decimals}f}"
    if of is not None and stat["n"] < of:
        text += f" ({stat['n']} of {of})"
    return text


def _table(summary: dict[str, Any], present: list[Metric]) -> list[str]:
    header = ["method", *(m.title for m in present), "seeds", "updates", "best at update", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    rows = [summary["pretrained"], *(row["metrics"] for row in summary["methods"].values())]
    decimals = {}  # one number of decimals per column, by its largest mean
    for m in present:
        means = [abs(row[m.key]["mean"]) for row in rows if row[m.key] is not None]
        decimals[m.key] = _decimals(max(means)) if means else 3
    if any(stat is not None for stat in summary["pretrained"].values()):
        cells = [format_stat(summary["pretrained"][m.key], decimals=decimals[m.key]) for m in present]
        lines.append("| pretrained (update 0) | " + " | ".join(cells) + " | — | 0 | — | — |")
    for method, row in summary["methods"].items():
        seeds = len(row["seeds"])
        cells = [format_stat(row["metrics"][m.key], seeds, decimals[m.key]) for m in present]
        updates = "/".join(str(u) for u in row["updates"])
        best = "/".join(str(u) for u in row["best_updates"]) or "—"
        seeds_text = f"{seeds}" if seeds == row["runs"] else f"{seeds} of {row['runs']}"
        wall = row["wall_time"]
        wall_text = f"{wall['mean']:.0f}" if wall and wall["mean"] >= 10 else f"{wall['mean']:.2f}" if wall else "—"
        lines.append(f"| `{method}` | " + " | ".join([*cells, seeds_text, updates, best, wall_text]) + " |")
    return lines


def _run_table(results: list[RunResult], present: list[Metric]) -> list[str]:
    header = ["run", "state", "best at update", *(m.title for m in present), "final reward", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in results:
        best, final = r.best, (r.evaluations[-1] if r.evaluations else {})
        cells = [f"{best[m.key]:.4g}" if best and _finite(best.get(m.key)) else "n/a" for m in present]
        final_reward = f"{final[REWARD]:.4g}" if _finite(final.get(REWARD)) else "n/a"
        wall = f"{r.wall_time:.1f}" if r.wall_time is not None else "—"
        state = r.note or r.state
        lines.append(f"| {run_name(r.method, r.seed)} | {state} | {best['update'] if best else '—'} | "
                     + " | ".join([*cells, final_reward, wall]) + " |")
    return lines


def machine_info(jobs: int, device: str) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads_per_run": 1, "parallel_runs": jobs, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _machine_text(info: dict[str, Any]) -> str:
    text = (f"{info['platform']} ({info['processor']}), {info['cpu_count']} CPUs, Python {info['python']}, "
            f"torch {info['torch']}, {info['threads_per_run']} thread per run, {info['parallel_runs']} run(s) in "
            f"parallel, device {info['device']}")
    return text + (f" ({info['gpu']})" if "gpu" in info else "")


def render_markdown(
    summary: dict[str, Any], results: list[RunResult], present: list[Metric], missing: list[Metric],
    header: dict[str, Any], figures: dict[str, str],
) -> str:
    """``results.md``: provenance, Table 1, how to read it, what is missing, per-run numbers and the figures."""
    lines = ["# Method comparison", ""]
    lines.append(f"- command: `{header['command']}`")
    lines.append(f"- date: {header['date']}")
    lines.append(f"- machine: {_machine_text(header['machine'])}")
    if header.get("report_command"):
        lines.append(f"- report rebuilt on {header['report_date']} by `{header['report_command']}`")
    lines += ["", "## Table 1: each method at its best-reward evaluation", ""]
    lines += _table(summary, present)
    lines += [
        "",
        "Each run is evaluated every `train.eval_every` updates with the same sampling seed; a cell is the mean ± "
        "sample standard deviation over seeds of that metric at each run's **best-reward evaluation** (the "
        "evaluation after update 0 with the highest mean log-reward; *best at update* lists them per seed). "
        "↑: higher is better, ↓: lower is better. Reward is the mean log R of the evaluation samples; diversity "
        "the mean pairwise feature distance per prompt; FID to pretrained the Fréchet distance to pretrained "
        "samples of the same prompts (its pretrained value is the finite-sample floor). A reward maximiser "
        "typically buys reward with diversity and FID; compare methods along the whole trade-off in `pareto.png`. "
        "Wall time: training wall time of the last update (the trainer's `time`, evaluations in between "
        "included), mean over seeds.",
    ]
    if summary["references"]:
        lines += ["", "References: " + "; ".join(f"{REFERENCES[key]} (`{key}`) {stat['mean']:.4g}"
                                                 for key, stat in summary["references"].items()) + "."]
    missing_paper = [m for m in missing if not m.ground_truth]
    missing_truth = [m for m in missing if m.ground_truth]
    if missing_paper:
        lines += ["", "**Missing:** no run's evaluations hold " + ", ".join(f"`{m.key}`" for m in missing_paper)
                  + " (e.g. the Gaussian mixture has no image features, `eval.features`, `eval.prior_fid=false`); "
                  "they are left out of the table, not shown as 0."]
    if missing_truth:
        lines += ["", "Ground-truth metrics not logged by these runs (they exist only where the target is known): "
                  + ", ".join(f"`{m.key}`" for m in missing_truth) + "."]
    if any(row["metrics"][m.key] is None for row in summary["methods"].values() for m in present):
        lines += ["", "n/a: that method's evaluations do not hold the metric (e.g. the reward maximisers DDPO, "
                  "ReFL, DRaFT, AlignProp have no exact target, so no distance to it)."]
    notes = [r for r in results if r.note]
    if notes:
        lines += ["", "**Runs not finished:** " + "; ".join(f"{run_name(r.method, r.seed)}: {r.note}" for r in notes)
                  + ". Rerun the command to resume them (diverged runs are kept as they are)."]
    lines += ["", "## Per run (best-reward evaluation)", ""]
    lines += _run_table(results, present)
    lines += ["", "## Figures", ""]
    captions = {
        "curves.png": "metrics against update and training wall time (mean over seeds, shaded ± std)",
        "pareto.png": "reward against diversity and FID, one point per evaluated checkpoint (larger: later)",
        "grids.png": "samples of each method from the same seeds and conditions",
    }
    for name, caption in captions.items():
        if name not in figures:
            lines.append(f"- `{name}`: not written (nothing to plot)")
        else:
            lines.append(f"- [`{name}`]({name}): {caption}" + (f"; {figures[name]}" if figures[name] else ""))
    return "\n".join(lines) + "\n"


def method_curves(results: list[RunResult], present: list[Metric]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per method and metric, the mean and std over seeds at each evaluated update, with the mean wall time."""
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        for metric in present:
            by_update: dict[int, list[tuple[float, float]]] = {}
            for r in runs:
                for e in r.evaluations:
                    if _finite(e.get(metric.key)):
                        by_update.setdefault(e["update"], []).append((e[metric.key], e["time"]))
            if not by_update:
                continue
            updates = sorted(by_update)
            stats = [mean_std([v for v, _ in by_update[u]]) for u in updates]
            curves.setdefault(method, {})[metric.key] = {
                "update": updates,
                "time": [statistics.fmean(t for _, t in by_update[u]) for u in updates],
                "mean": [s["mean"] for s in stats],
                "std": [s["std"] if s["std"] is not None else float("nan") for s in stats],
            }
    return curves


def write_grids(results: list[RunResult], path: Path, seed: int = 0, progress: bool = False) -> Path | None:
    """Samples of every method (the latest checkpoint of its first run) and of the pretrained model, all from the
    same seed, hence the same conditions and initial noise; ``None`` when no run has a checkpoint. ``progress``: a
    bar over the methods (each loads its model and samples)."""
    import torch
    from tqdm.auto import tqdm

    from ..train.checkpoint import list_checkpoints
    from ..train.run import load_run
    from ..viz import plot_image_grids, plot_vector_samples

    chosen: dict[str, tuple[RunResult, Path]] = {}
    for r in results:
        checkpoints = list_checkpoints(r.run_dir)
        if checkpoints and r.method not in chosen:
            chosen[r.method] = (r, checkpoints[-1])
    if not chosen:
        return None
    panels: dict[str, torch.Tensor] = {}
    vectors = False
    bar = tqdm(chosen.items(), desc="report: sample grids", unit="method", disable=not progress)
    for index, (method, (r, checkpoint)) in enumerate(bar):
        run = load_run(r.run_dir, checkpoint)
        vectors = len(run.backend.sample_shape) == 1
        small = vectors or max(run.backend.sample_shape[1:]) <= 16  # digits-sized images: a full grid each
        num = 2000 if vectors else 32 if small else 8
        sides = [(False, "pretrained")] if index == 0 else []
        for finetuned, label in [*sides, (True, f"{method} (seed {r.seed}, update {int(checkpoint.name[7:])})")]:
            states, cond = run.sample_with_conditions(num, seed=seed, finetuned=finetuned)
            log_reward = run.log_reward(states, cond).mean().item()
            panels[f"{label}\nmean log R {log_reward:.3g}"] = states.cpu() if vectors else run.decode(states).cpu()
        del run  # one model in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    title = f"same seed ({seed}) and conditions for every panel"
    if vectors:
        plot_vector_samples(panels, path, title, panels_per_row=4)
    else:
        plot_image_grids(panels, path, title, columns=8 if num == 32 else 4, panels_per_row=4)
    return path


def write_report(out: Path, results: list[RunResult], header: dict[str, Any], grids: bool = True,
                 progress: bool = False) -> dict[str, Any]:
    """Write results.md, summary.json, curves.png, pareto.png and grids.png into ``out``; returns the summary.
    ``progress``: say what is being written, with a bar over the sample grids."""
    from ..viz import plot_method_curves, plot_pareto

    if progress:
        print(f"report: tables and figures of {len(results)} runs …", flush=True)
    present, missing = present_metrics(results)
    summary = summarize(results)
    labels = {m.key: m.title for m in present}
    figures: dict[str, str] = {}  # figure written → a remark for results.md ("" for none)
    for name in REPORT_FILES[2:]:  # a figure with nothing to plot must not linger from an earlier report
        (out / name).unlink(missing_ok=True)
    curves = method_curves(results, present)
    if plot_method_curves(curves, labels, out / "curves.png", "mean over seeds, shaded ± std"):
        figures["curves.png"] = ""
    trade_offs = [m.key for m in present if m.key in ("eval/diversity", "eval/fid_to_pretrained")]
    pareto_note = ""
    if not trade_offs:  # e.g. the Gaussian mixture: its distances to the exact target instead
        trade_offs = [m.key for m in present if m.ground_truth][:2]
        pareto_note = "no diversity or FID logged: against the ground-truth metrics instead"
    runs_by_method: dict[str, list[list[dict[str, float]]]] = {}
    for r in results:
        runs_by_method.setdefault(r.method, []).append([e for e in r.evaluations if e["update"] > 0])
    reference = {k: v["mean"] for k, v in summary["pretrained"].items() if v is not None}
    pareto_path = plot_pareto(runs_by_method, REWARD, trade_offs, labels, out / "pareto.png", reference,
                              "one point per evaluated checkpoint (larger: later)") if REWARD in labels else None
    if pareto_path:
        figures["pareto.png"] = pareto_note
    if grids and write_grids(results, out / "grids.png", progress=progress):
        figures["grids.png"] = ""
    summary["header"] = header
    atomic_write_text(out / "summary.json", strict_json(summary, indent=1))
    atomic_write_text(out / "results.md", render_markdown(summary, results, present, missing, header, figures))
    return summary
