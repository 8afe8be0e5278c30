"""Stable Diffusion 1.5 or 3 (medium) at its real size (random weights): seconds per update, residual ∇-DB's
overhead over its necessary passes and peak memory, against DAG-DB, DDPO and DRaFT-1 (SD3: also Flow-GRPO), through
``method_costs.py``'s measurements.

    python benchmarks/sd_scale.py --device cpu [--latent-size 16] [--out benchmarks/results/sd_scale/cpu.json]
    python benchmarks/sd_scale.py --device cuda --out benchmarks/results/sd_scale/cuda.json
    python benchmarks/sd_scale.py --model sd3 --device cuda --out benchmarks/results/sd_scale/sd3_cuda.json

Each method's cost is measured side by side with residual ∇-DB's (``method_costs.py --parts cost``, one pair of
runs per method: the runs of a pair take turns on the same machine, and only two SD 1.5 runs are held at once, about
4.4 GB each in fp32), then residual ∇-DB's overhead over its necessary passes; ``--parts memory`` adds each method's
measured peak memory (fresh process per method). For the memory of the paper's full setting on a GPU, without one,
see ``sd_memory.py``.

``--device cpu`` uses reduced settings so that it runs on this 2-core CPU in about 15 minutes: SD 1.5's
architecture at ``--latent-size`` (default 16: 128×128 images; 32 takes about 25 minutes; 64 is 512×512), fp32,
4 sampler steps, 2
trajectories per epoch and 1 per update. ``--device cuda`` uses the paper's sampler (50 steps) at 64×64 latents,
bf16 base weights and gradient checkpointing, 8 trajectories per epoch and 2 per update. The architecture is written
by ``sd15_architecture.py`` (``sd3_architecture.py`` for ``--model sd3``: the MMDiT transformer of 2 B parameters, the
VAE and the two CLIP text encoders, without T5; in fp32 its weights take about 12 GB per run, 24 GB for the two runs
of a pair, so run it on a GPU). The reward is the weight-free brightness (the reward towers' own cost is not in
these figures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = "residual_nabla_db"
METHODS = {"sd15": ["dag_db", "ddpo", "draft"], "sd3": ["dag_db", "ddpo", "flow_grpo", "draft"]}
CUDA_OVERRIDES = ["sampler.steps=50", "train.trajectories_per_epoch=8", "train.batch_size=2", "model.dtype=bf16",
                  "model.gradient_checkpointing=true", "model.sample_batch_size=8"]


def method_costs(args: argparse.Namespace, methods: list[str], parts: list[str], sd_path: Path, out: Path) -> dict:
    """One ``method_costs.py`` invocation; its JSON."""
    command = [sys.executable, str(HERE / "method_costs.py"), "--model", args.model, "--device", args.device,
               "--latent-size", str(args.latent_size), "--threads", str(args.threads), "--methods", *methods,
               "--parts", *parts, "--repeats", "1", "--overhead-repeats", "1", "--sd-path", str(sd_path),
               "--out", str(out), "--override",
               *(CUDA_OVERRIDES if args.device.startswith("cuda") else ["model.dtype=fp32"])]
    print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"method_costs.py failed (exit {done.returncode}) for {methods} {parts}")
    return json.loads(out.read_text())


def markdown(results: dict) -> str:
    name = {"sd15": "SD 1.5", "sd3": "SD3 medium"}[results.get("model", "sd15")]
    lines = [f"# {name} at its real size: `{results['command']}`", "", results["machine"], "",
             "## Cost of one update, each method in a pair with residual ∇-DB", "",
             "| method | s per update (incl. sampling share) | sampling share | update alone | residual ∇-DB in the "
             "same pair, s per update | × residual ∇-DB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, pair in results["pairs"].items():
        row, reference = pair["rows"][name], pair["rows"][REFERENCE]
        note = " (conditions only)" if row["draws_own_chains"] else ""
        lines.append(f"| {name} | {row['per_update_s']:.1f} | {row['rollout_share_s']:.1f}{note} | "
                     f"{row['update_alone_s']:.1f} | {reference['per_update_s']:.1f} | "
                     f"{row['ratio_to_reference']:.2f} |")
    if "overhead" in results:
        o = results["overhead"]
        lines += ["", f"## Residual ∇-DB: its update against its necessary passes ({o['transitions']} transitions "
                  "per update)", "", "| pass | s |", "| --- | --- |"]
        lines += [f"| {name} | {seconds:.2f} |" for name, seconds in o["necessary"].items()]
        lines += [f"| **sum of the necessary passes** | **{o['necessary_sum_s']:.2f}** |",
                  f"| **update + rollout share** | **{o['update_with_rollout_share_s']:.2f}** |",
                  f"| **ratio** | **{o['ratio']:.2f}** ({o['ratio_without_rollout']:.2f} without the rollout) |"]
    if "memory" in results:
        lines += ["", f"## Peak memory ({results['memory']['how']})", "",
                  "| method | sampling an epoch, peak (MB) | update, peak (MB) |", "| --- | --- | --- |"]
        lines += [f"| {name} | {row['sampling_peak_mb']:.0f} | {row['update_peak_mb']:.0f} |"
                  for name, row in results["memory"]["rows"].items()]
    return "\n".join(lines)


def save_architecture(model: str, path: Path, latent_size: int) -> Path:
    """The random-weight pipeline of ``model`` (fp16 files) at ``latent_size``."""
    sys.path.insert(0, str(HERE))
    if model == "sd3":
        from sd3_architecture import save_sd3

        return save_sd3(path, latent_size, "fp16")
    from sd15_architecture import save_sd15

    return save_sd15(path, latent_size, "fp16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "sd3"], default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latent-size", type=int, help="latent side (default: 16 on the CPU, 64 on CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", help="compared with residual ∇-DB, one pair each (default: DAG-DB, "
                        "DDPO, DRaFT-1, and Flow-GRPO for SD3)")
    parser.add_argument("--parts", nargs="+", default=["cost", "overhead"], choices=["cost", "overhead", "memory"])
    parser.add_argument("--sd-path", type=Path, help="a directory written by sd15_architecture.py or "
                        "sd3_architecture.py (default: write one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.methods = args.methods or METHODS[args.model]
    if args.latent_size is None:
        args.latent_size = 64 if args.device.startswith("cuda") else 16
    with tempfile.TemporaryDirectory() as workdir:
        sd_path = args.sd_path or save_architecture(args.model, Path(workdir) / args.model, args.latent_size)
        results: dict = {"command": "python benchmarks/sd_scale.py " + " ".join(sys.argv[1:]), "model": args.model,
                         "pairs": {}}
        if "cost" in args.parts:
            for name in args.methods:
                pair = method_costs(args, [REFERENCE, name], ["cost"], sd_path, Path(workdir) / f"{name}.json")
                results["pairs"][name] = pair["cost"]
                results["machine_record"] = pair["machine"]
        if "overhead" in args.parts:
            single = method_costs(args, [REFERENCE], ["overhead"], sd_path, Path(workdir) / "overhead.json")
            results["overhead"], results["machine_record"] = single["overhead"], single["machine"]
        if "memory" in args.parts:
            memory = method_costs(args, [REFERENCE, *args.methods], ["memory"], sd_path, Path(workdir) / "memory.json")
            results["memory"], results["machine_record"] = memory["memory"], memory["machine"]
    sys.path.insert(0, str(HERE))
    from method_costs import machine_line

    results["machine"] = machine_line(results["machine_record"])
    print(markdown(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
