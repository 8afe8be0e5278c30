"""``nablagfn compare``: train a grid of methods × seeds alike and report their trade-offs (the paper's Table 1).

A report directory ``OUT`` holds
  runs/<method>_seed<k>/  ordinary run directories (config.yaml, metrics.jsonl, checkpoints/, eval.json)
  compare.json            the grid's command line, date and machine
  results.md              Table 1: each method at its runs' best-reward evaluations, mean ± std over seeds
  summary.json            every number behind the table, and each run's evaluations
  curves.png, pareto.png  metrics against update and wall time; reward against diversity / FID per checkpoint
  grids.png               samples of every method (and the pretrained model) from the same seeds
Runs are resumable: a finished run (its final checkpoint exists) is skipped, an unfinished one continues from its
last checkpoint, so a killed compare loses at most the updates since each run's last checkpoint.
``grid.py`` plans and trains the runs, ``report.py`` reads them back and writes the report.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import atomic_write_text, strict_json
from ..methods import METHODS
from .grid import load_settings, plan_grid, run_grid, run_name
from .report import discover_runs, machine_info, read_run, write_report

__all__ = ["compare", "discover_runs", "load_settings", "plan_grid", "read_run", "run_grid"]


# -- the command ---------------------------------------------------------------------------------------------------
def command_line(
    methods: list[str], seeds: list[int], out: Path, config_file: str | None, settings_file: str | None,
    overrides: list[str], jobs: int,
) -> str:
    """The canonical command of a grid (which also resumes it)."""
    parts = ["nablagfn", "compare", "--methods", *methods, "--seeds", *map(str, seeds)]
    for flag, value in (("--config", config_file), ("--settings", settings_file)):
        if value:
            parts += [flag, str(value)]
    parts += ["--jobs", str(jobs), "--out", str(out), *overrides]
    return shlex.join(parts)


def compare(
    out: Path,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    config_file: str | None = None,
    settings_file: str | None = None,
    overrides: list[str] = (),
    jobs: int = 1,
    progress: bool = True,
    report_only: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Plan (and validate) the grid, train what is not finished, write the report. Returns the exit code: 0, or 1
    when a run failed (the report is written either way); raises ConfigError before any work for a bad grid."""
    out = Path(out)
    now = datetime.now().isoformat(timespec="seconds")
    if jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1 (got {jobs})")
    if report_only:
        specs = discover_runs(out, methods, seeds)
        grid_path = out / "compare.json"
        grid = json.loads(grid_path.read_text()) if grid_path.is_file() else {}
        report_command = ["nablagfn", "compare", "--report-only", *(["--methods", *methods] if methods else []),
                          *(["--seeds", *map(str, seeds)] if seeds else []), "--out", str(out)]
        header = {
            "command": grid.get("command", "unknown (no compare.json)"),
            "date": grid.get("date", "unknown"),
            "machine": grid.get("machine") or machine_info(jobs, specs[0].config.train.device),
            "report_command": shlex.join(report_command), "report_date": now,
        }
        outcomes: list[dict[str, Any]] = []
    else:
        methods = list(METHODS) if methods is None else methods
        seeds = [0, 1, 2] if seeds is None else seeds
        specs = plan_grid(methods, seeds, out, config_file, overrides, load_settings(settings_file))
        command = command_line(methods, seeds, out, config_file, settings_file, list(overrides), jobs)
        header = {"command": command, "date": now, "machine": machine_info(jobs, specs[0].config.train.device)}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.json", strict_json({**header, "methods": methods, "seeds": seeds}, indent=1))
        echo(f"report directory: {out} ({len(specs)} runs; rerun the same command to resume)")
        outcomes = run_grid(specs, jobs, progress, echo)
    results = [read_run(spec) for spec in specs]
    for outcome in outcomes:  # a failure of this invocation, in the report
        if outcome["status"] == "failed":
            result = next(r for r in results if run_name(r.method, r.seed) == outcome["name"])
            result.note = f"failed: {outcome['error']}"
    write_report(out, results, header, progress=progress)
    echo(f"report: {out / 'results.md'} (+ summary.json, curves.png, pareto.png, grids.png)")
    failed = [o["name"] for o in outcomes if o["status"] == "failed"]
    if failed:
        echo(f"failed runs: {', '.join(failed)} (see above; rerun the command to retry them)")
    return 1 if failed else 0
