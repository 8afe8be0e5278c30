"""Peak memory of one training update with and without gradient checkpointing, in fp32 and bf16 base weights.

On the tests' random-weight Stable Diffusion pipeline (``tests/tiny_sd.py``) with the ``sd-tiny`` settings of
``method_costs.py`` (brightness reward, g_φ widths [8, 16], 20-step DDPM, 8 trajectories per epoch, 4 per
update, CFG 5), at a latent side of ``--latent-size`` (default 16: 4×16×16 latents, 32×32 images, where the
activations of an update outweigh the few MB of weights and the allocator's noise; the pipeline's own 8×8 shows
the same direction with smaller numbers). Every configuration (method × ``model.dtype`` ×
``model.gradient_checkpointing``) runs in a fresh process, which builds the run, samples an epoch and makes its
two updates; the peak of an update is measured as in ``method_costs.py`` (``PeakMemory``: on the
CPU the resident-set high-water mark above the resident set before, on CUDA ``torch.cuda.max_memory_allocated``
above the allocation before), and the table gives the larger of the two updates (the first also allocates
AdamW's state). Seconds per update are one measurement each, for orientation only.

    python benchmarks/memory_precision.py --out benchmarks/results/memory_precision/sd-tiny-16.json
    python benchmarks/memory_precision.py --methods residual_nabla_db --latent-size 32
    python benchmarks/memory_precision.py --device cuda --dtypes fp32 bf16 fp16 --latent-size 64

Prints a Markdown table (the machine on top) and writes every number with ``--out``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from method_costs import (
    MALLOC_ENV,
    MB,
    MODELS,
    PeakMemory,
    _trim,
    clock,
    machine,
    machine_line,
    median,
    one_update,
    publish,
    tiny_sd_pipeline,
)

from nablagfn.config_loading import load_config
from nablagfn.methods import METHODS
from nablagfn.train.trainer import Trainer

DEFAULT_METHODS = ("residual_nabla_db", "draft", "refl")
DTYPES = ("fp32", "bf16", "fp16")
#: the configuration every other row of the same method is compared with
BASELINE = ("fp32", False)


def configurations(methods: list[str], dtypes: list[str]) -> list[dict]:
    """Every method × dtype × checkpointing (off, then on), in table order."""
    return [{"method": method, "dtype": dtype, "gradient_checkpointing": checkpointing}
            for method in methods for dtype in dtypes for checkpointing in (False, True)]


def overrides(config: dict, sd_path: str, device: str, extra: list[str]) -> list[str]:
    """The run's config overrides: ``method_costs``'s ``sd-tiny`` settings, then this configuration, then ``extra``."""
    return [*MODELS["sd-tiny"][0], f"model.path={sd_path}", f"method.name={config['method']}",
            f"model.dtype={config['dtype']}", f"model.gradient_checkpointing={config['gradient_checkpointing']}",
            f"train.device={device}", *extra]


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(config: dict, sd_path: str, device: str, extra: list[str]) -> dict:
    """Build the run, sample an epoch and make its updates; memory in MB above what was in use before each block."""
    meter = PeakMemory(device)
    with tempfile.TemporaryDirectory() as workdir:
        _trim()
        before = meter.in_use()
        trainer = Trainer.from_config(load_config(None, overrides(config, sd_path, device, extra)), Path(workdir) / "run",
                          progress=False)
        _trim()
        built = meter.in_use() - before
        trainable = [p for group in trainer.parameter_groups.values() for p in group]
        trained = {id(p) for p in trainable}
        frozen = [p for p in trainer.run.backend.parameters() if id(p) not in trained]
        sampling: list[int] = []
        with meter.peak(sampling):
            trainer.sample_epoch()
        peaks: list[int] = []
        seconds: list[float] = []
        losses: list[float] = []
        while trainer.in_epoch:
            with meter.peak(peaks):
                began = clock(device)
                metrics = one_update(trainer)
                seconds.append(clock(device) - began)
            if "skipped_nonfinite" in metrics or not math.isfinite(metrics["loss"]):
                raise RuntimeError(f"{config}: an update had a non-finite loss or gradient")
            losses.append(metrics["loss"])
    return {**config, "base_weights_mb": tensor_bytes(frozen) / MB, "trainable_mb": tensor_bytes(trainable) / MB,
            "run_built_mb": built / MB, "sampling_peak_mb": sampling[0] / MB,
            "update_peak_mb": max(peaks) / MB, "update_peaks_mb": [p / MB for p in peaks], "update_s": seconds,
            "losses": losses}


def measure_in_child(config: dict, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh Python process, with glibc told to give freed memory back at once."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config), "--sd-path",
               args.sd_path, "--device", args.device, "--threads", str(args.threads), "--override", *args.override]
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"measurement of {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def how_measured(device: str) -> str:
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated above the allocation before"
    return ("resident-set high-water mark (VmHWM, reset by /proc/self/clear_refs) above the resident set before, "
            "glibc returning freed memory at once")


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's update peak and seconds per update over its method's fp32 row without checkpointing."""
    baselines = {row["method"]: row for row in rows if (row["dtype"], row["gradient_checkpointing"]) == BASELINE}
    for row in rows:
        base = baselines.get(row["method"])
        row["peak_ratio"] = row["update_peak_mb"] / base["update_peak_mb"] if base else math.nan
        row["time_ratio"] = median(row["update_s"]) / median(base["update_s"]) if base else math.nan
    return rows


def markdown(results: dict) -> str:
    side = results["latent_size"]
    lines = [f"# Peak memory of one update, by precision and gradient checkpointing: `{results['command']}`", "",
             machine_line(results["machine"]),
             f"Model: tiny random-weight Stable Diffusion pipeline at 4×{side}×{side} latents ({2 * side}×{2 * side} "
             f"images), `{' '.join(results['settings'])}`. Memory: {results['how']}.", "",
             "| method | model.dtype | gradient checkpointing | base weights (MB) | trainable (MB) "
             "| run built (MB) | sampling peak (MB) | update peak (MB) | × fp32, off | s per update | × fp32, off |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        lines.append(f"| {row['method']} | {row['dtype']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                     f"{row['base_weights_mb']:.2f} | {row['trainable_mb']:.2f} | {row['run_built_mb']:.1f} | "
                     f"{row['sampling_peak_mb']:.1f} | {row['update_peak_mb']:.1f} | "
                     f"{row['peak_ratio']:.2f} | {median(row['update_s']):.2f} | {row['time_ratio']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=DTYPES,
                        help="model.dtype of the frozen base weights (default: fp32 bf16)")
    parser.add_argument("--latent-size", type=int, default=16, help="latent side of the tiny pipeline (default 16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides for every run")
    parser.add_argument("--out", type=Path, help="write every number as JSON")
    parser.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--sd-path", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(measure(args.child, args.sd_path, args.device, args.override)))
        return
    results: dict = {"command": " ".join(["python benchmarks/memory_precision.py", *sys.argv[1:]]),
                     "machine": machine(args.device), "latent_size": args.latent_size,
                     "settings": [s for s in MODELS["sd-tiny"][0] if not s.startswith("model.dtype")] + args.override,
                     "how": how_measured(args.device)}
    with tempfile.TemporaryDirectory() as workdir:
        args.sd_path = tiny_sd_pipeline(Path(workdir), latent_size=args.latent_size)
        rows = [measure_in_child(config, args) for config in configurations(args.methods, args.dtypes)]
    results["rows"] = add_ratios(rows)
    publish(results, markdown, args.out)


if __name__ == "__main__":
    main()
