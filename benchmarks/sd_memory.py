"""Peak memory of Stable Diffusion 1.5 finetuning at the paper's full setting (or of SD3-medium's), estimated without
a GPU.

Why an estimate: the paper's setting (512×512 images, 50-step DDPM, CFG 5, LoRA r8, the flow UNet, the aesthetic
reward on CLIP ViT-L/14) needs a GPU to run, but which tensors exist at once does not depend on weight values nor on
the device. So each configuration builds the real run (``Trainer.from_config`` on SD 1.5's architecture with random
weights, ``sd15_architecture.py``; the aesthetic tower at its real size with random weights), swaps every weight for
a fake tensor (``torch._subclasses.FakeTensorMode``: shapes, dtypes and storages, no data) and runs the trainer's own
``sample_epoch()`` and ``update()`` on the fakes, seconds instead of GPU-minutes. ``PeakMemory``, a dispatch mode,
counts the bytes of every live tensor storage (weights, buffers, gradients, optimiser state, activations,
temporaries), freed when the storage is, and keeps the high-water mark. Data-dependent scalars (logged metrics, the
finiteness check) read as 1 on fakes; nothing in the update's memory depends on them.

What the figure is: live tensor bytes, which is what ``torch.cuda.max_memory_allocated`` reports. A CUDA process
needs more than that: its context (≈ 0.3–0.6 GB) and the caching allocator's rounding and fragmentation; the
tables add neither. Attention runs through ``scaled_dot_product_attention``; the estimate takes the CPU's fused
kernel, which keeps the output and the log-sum-exp as CUDA's flash and memory-efficient kernels do.

``--model sd3`` does the same for Stable Diffusion 3 medium (``sd3_architecture.py``: its transformer, VAE and two
CLIP encoders at their published sizes with random weights, 1024 px, the method's flow sampler, 28 steps by default),
without T5-XXL: its ≈ 9.5 GB of bf16 weights come on top of the tables when ``model.t5`` keeps it on the GPU.

``--check`` measures how close the estimate is where a measurement exists: the same update on real tensors on this
CPU (at reduced settings), counted by the same dispatch mode and by the resident set's high-water mark.

    python benchmarks/sd_memory.py --out benchmarks/results/sd_scale/memory_estimate.json
    python benchmarks/sd_memory.py --methods residual_nabla_db dag_db ddpo draft --dtypes bf16 --checkpointing on
    python benchmarks/sd_memory.py --check --out benchmarks/results/sd_scale/memory_estimate_check.json
    python benchmarks/sd_memory.py --model sd3 --dtypes bf16 --batch-sizes 1 2 \
        --out benchmarks/results/sd_scale/sd3_memory_estimate.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

HERE = Path(__file__).resolve().parent
GB = 1e9
#: tensors up to this many elements are computed for real under ``Estimate`` (indices, conditions, per-sample values)
SMALL = 2**16
METHODS = ["residual_nabla_db"]
#: --model → (model.kind, name, sampler, default latent side, default steps)
MODELS = {"sd15": ("stable_diffusion", "SD 1.5", "DDPM", 64, 50),
          "sd3": ("stable_diffusion_3", "SD3-medium", "flow sampler", 128, 28)}
BUDGETS_GB = (24, 40, 80)
#: left out of a GPU's memory for what the estimate does not count: the CUDA context and the caching allocator's slack
RESERVE_GB = 1.0
#: transformers' CLIPConfig of openai/clip-vit-large-patch14 (the aesthetic predictor's tower), sizes only
CLIP_L14 = dict(
    projection_dim=768,
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408, projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=768),
)


class PeakMemory(TorchDispatchMode):
    """Live bytes of every tensor storage created (or first touched) inside the mode, and their high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages = WeakIdKeyDictionary()

    def track(self, tensor: object) -> None:
        """Count ``tensor``'s storage from now until it is freed (once, however many tensors view it)."""
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage in self._storages:
            return
        size = storage.nbytes()
        self._storages[storage] = weakref.ref(storage, lambda _, size=size: self._free(size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, size: int) -> None:
        self.live -= size

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        return out


class EstimateMode(FakeTensorMode):
    """Fake tensors whose data-dependent scalars (``.item()``, ``bool()``) read as 1: the logged metrics, and the
    trainer's finiteness check on the loss, which passes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1
        return super().__torch_dispatch__(func, types, args, kwargs)


class RealWhenSmall(TorchDispatchMode):
    """Above ``EstimateMode``: an op whose tensors are all real and small (at most ``SMALL`` elements; a factory op
    whose output is small) runs for real, so indices, step choices and conditions keep their values and the
    control flow that reads them (which states are final, which steps are trained) goes as it would on a GPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(isinstance(t, FakeTensor) or t.numel() > SMALL for t in tensors):
            return func(*args, **kwargs)
        if not tensors:  # a factory: its fake output tells the size
            out = func(*args, **kwargs)
            if any(isinstance(t, torch.Tensor) and t.numel() > SMALL for t in tree_flatten(out)[0]):
                return out
        with _disable_current_modes():
            return func(*args, **kwargs)


def modules_of(trainer) -> list[nn.Module]:
    return [trainer.run.backend, trainer.run.method.networks, trainer.run.reward]


def swap_for_fakes(trainer, mode: FakeTensorMode) -> None:
    """Every parameter and buffer of the run becomes a fake tensor of the same shape, dtype and ``requires_grad``;
    the optimisers are pointed at the new parameters."""
    fakes: dict[nn.Parameter, nn.Parameter] = {}
    for module in modules_of(trainer):
        for sub in module.modules():
            for name, parameter in list(sub._parameters.items()):
                if parameter is not None:
                    if parameter not in fakes:
                        fakes[parameter] = nn.Parameter(mode.from_tensor(parameter.detach()),
                                                        requires_grad=parameter.requires_grad)
                    sub._parameters[name] = fakes[parameter]
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = mode.from_tensor(buffer)
    for optimizer in trainer.optimizers.values():
        for group in optimizer.param_groups:
            group["params"] = [fakes[p] for p in group["params"]]


def count_resident(trainer, tracker: PeakMemory) -> None:
    for module in modules_of(trainer):
        for tensor in [*module.parameters(), *module.buffers()]:
            tracker.track(tensor)


def write_aesthetic_tower(directory: Path) -> tuple[Path, Path]:
    """CLIP ViT-L/14 with random weights (``save_pretrained``) and the LAION MLP head's state dict."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    clip_dir = directory / "clip-vit-large-patch14"
    CLIPModel(CLIPConfig(**CLIP_L14)).save_pretrained(clip_dir)
    sizes = [768, 1024, 128, 64, 16, 1]
    head = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        head[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in) / fan_in ** 0.5
        head[f"layers.{index}.bias"] = torch.zeros(fan_out)
    head_path = directory / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head, head_path)
    return clip_dir, head_path


def cell_overrides(args: argparse.Namespace, method: str, dtype: str, checkpointing: bool) -> list[str]:
    reward = (["reward.kind=aesthetic", f"reward.clip_model={args.clip_dir}", f"reward.head={args.head}"]
              if args.reward == "aesthetic" else ["reward.kind=brightness"])
    return [f"model.kind={MODELS[args.model][0]}", f"model.path={args.sd_path}", f"model.dtype={dtype}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}", f"sampler.steps={args.steps}",
            f"method.name={method}", "train.accumulation=1", "train.trajectories_per_epoch=1", "train.batch_size=1",
            "model.sample_batch_size=1", "train.device=cpu", *reward, *args.override]


def measure_cell(args: argparse.Namespace) -> dict:
    """In this process: the peaks of one (method, dtype, checkpointing) at each batch size, on fakes or real."""
    from nablagfn.config_loading import load_config
    from nablagfn.train.trainer import Trainer

    method, dtype, checkpointing = args.child
    config = load_config(None, cell_overrides(args, method, dtype, checkpointing == "on"))
    trainer = Trainer.from_config(config, Path(tempfile.mkdtemp()) / "run", progress=False)
    fakes = EstimateMode(allow_non_fake_inputs=True)
    if not args.real:
        swap_for_fakes(trainer, fakes)
    # one epoch holds a warm-up update of 1 trajectory (it creates the optimiser state) and one update per batch size
    batches = sorted(args.batch_sizes)
    epoch = batches[-1] * -(-(1 + sum(batches)) // batches[-1])
    if any(epoch % b for b in batches):
        raise SystemExit(f"--batch-sizes {batches}: each must divide {epoch}, the epoch that holds them all")
    train = trainer.config.train
    train.trajectories_per_epoch = epoch
    trainer.run.backend.sample_batch_size = epoch
    rows = []
    with contextlib.ExitStack() as modes:
        if not args.real:
            modes.enter_context(fakes)
            modes.enter_context(RealWhenSmall())
        tracker = PeakMemory()
        count_resident(trainer, tracker)
        resident_set = read_vm("VmRSS")
        started = time.perf_counter()
        with tracker:
            trainer.sample_epoch()
        sampling = {"trajectories": epoch, "resident_gb": tracker.live / GB, "peak_gb": tracker.peak / GB,
                    "seconds": time.perf_counter() - started}
        for batch in [1, *batches]:
            train.batch_size = batch
            tracker.reset_peak()
            before = tracker.live
            if args.real:
                resident_set = read_vm("VmRSS")
                reset_vm_peak()
            started = time.perf_counter()
            with tracker:
                trainer.update()
            rows.append({"batch": batch, "resident_gb": before / GB, "update_peak_gb": tracker.peak / GB,
                         "after_update_gb": tracker.live / GB, "seconds": time.perf_counter() - started,
                         **({"vm_hwm_above_start_gb": (read_vm("VmHWM") - resident_set) / GB} if args.real else {})})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    warm_up, *rows = rows
    return {"method": method, "dtype": dtype, "checkpointing": checkpointing, "real": args.real,
            "sampling": sampling, "warm_up": warm_up, "rows": rows}


def read_vm(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_vm_peak() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def largest_batch(rows: list[dict], budget_gb: float, reserve_gb: float = RESERVE_GB) -> int | None:
    """The largest batch whose peak fits ``budget_gb − reserve_gb``, from a line through the measured peaks (memory
    grows linearly with the batch: activations scale, weights do not); None if batch 1 does not fit."""
    budget_gb -= reserve_gb
    batches = [r["batch"] for r in rows]
    peaks = [r["update_peak_gb"] for r in rows]
    if len(rows) < 2:
        return rows[0]["batch"] if peaks[0] <= budget_gb else None
    slope = (peaks[-1] - peaks[0]) / (batches[-1] - batches[0])
    fixed = peaks[0] - slope * batches[0]
    if fixed + slope > budget_gb:
        return None
    return int((budget_gb - fixed) // slope) if slope > 0 else None


def run_child(args: argparse.Namespace, method: str, dtype: str, checkpointing: str, real: bool) -> dict:
    command = [sys.executable, __file__, "--child", method, dtype, checkpointing, "--sd-path", str(args.sd_path),
               "--model", args.model, "--steps", str(args.steps), "--reward", args.reward,
               "--batch-sizes", *map(str, args.batch_sizes)]
    if args.reward == "aesthetic":
        command += ["--clip-dir", str(args.clip_dir), "--head", str(args.head)]
    if real:
        command.append("--real")
    if args.override:
        command += ["--override", *args.override]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{method} {dtype} checkpointing {checkpointing} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    setting = results["setting"]
    _, name, sampler, _, _ = MODELS[setting.get("model", "sd15")]
    lines = [f"Machine: {results['machine']}.", "",
             f"{name} architecture (random weights), latents {setting['latent_size']}×{setting['latent_size']} "
             f"({8 * setting['latent_size']} px), {setting['steps']}-step {sampler}, reward `{setting['reward']}`; "
             f"{'measured on real tensors on this CPU' if setting['real'] else 'estimated on fake tensors'}; "
             "GB = 1e9 bytes of live tensors (no CUDA context, no allocator overhead)."
             + (f" Overrides: `{' '.join(setting['overrides'])}`." if setting.get("overrides") else ""), "",
             "| method | base weights | checkpointing | sampling an epoch: trajectories, peak | training batch "
             "| resident before (weights, optimiser state) | update peak |" + (" RSS peak above start |" if setting["real"] else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if setting["real"] else "")]
    for cell in results["cells"]:
        sampling = cell["sampling"]
        for row in [{**cell["warm_up"], "batch": "1 (first update)"}, *cell["rows"]]:
            rss = f" {row['vm_hwm_above_start_gb']:.2f} |" if "vm_hwm_above_start_gb" in row else ""
            lines.append(f"| {cell['method']} | {cell['dtype']} | {cell['checkpointing']} | "
                         f"{sampling['trajectories']}, {sampling['peak_gb']:.2f} | {row['batch']} | "
                         f"{row['resident_gb']:.2f} | {row['update_peak_gb']:.2f} |" + rss)
    if not setting["real"] and len(setting["batch_sizes"]) > 1:
        lines += ["", f"Largest training batch (trajectories per backward pass) whose peak fits the GPU's memory less "
                  f"{RESERVE_GB:.0f} GB (CUDA context, allocator slack), by a line through the measured batches:", "",
                  "| method | base weights | checkpointing | " + " | ".join(f"{b} GB" for b in BUDGETS_GB) + " |",
                  "| --- | --- | --- |" + " --- |" * len(BUDGETS_GB)]
        for cell in results["cells"]:
            fits = [largest_batch(cell["rows"], budget) for budget in BUDGETS_GB]
            lines.append(f"| {cell['method']} | {cell['dtype']} | {cell['checkpointing']} | "
                         + " | ".join("does not fit" if f is None else str(f) for f in fits) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model", choices=list(MODELS), default="sd15")
    parser.add_argument("--latent-size", type=int, help="default 64 for sd15 (512×512 images), 128 for sd3 (1024×1024)")
    parser.add_argument("--steps", type=int, help="default 50 for sd15, 28 for sd3")
    parser.add_argument("--reward", choices=["aesthetic", "brightness"], default="aesthetic")
    parser.add_argument("--sd-path", type=Path,
                        help="a directory written by sd15_architecture.py or sd3_architecture.py (default: write one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true",
                        help="fakes against real tensors on this CPU, at 32×32 latents, 4 steps, fp32, batch 1")
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--real", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clip-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--head", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure_cell(args)))
        return
    _, _, _, latent_size, steps = MODELS[args.model]
    args.latent_size, args.steps = args.latent_size or latent_size, args.steps or steps
    if args.check:
        args.latent_size, args.steps, args.batch_sizes, args.dtypes, args.checkpointing = 32, 4, [1], ["fp32"], ["off"]
    with tempfile.TemporaryDirectory() as workdir:
        sys.path.insert(0, str(HERE))
        from sd3_architecture import save_sd3
        from sd15_architecture import save_sd15

        if args.sd_path is None:
            save = save_sd3 if args.model == "sd3" else save_sd15
            args.sd_path = save(Path(workdir) / args.model, args.latent_size, "fp16")
        if args.reward == "aesthetic":
            args.clip_dir, args.head = write_aesthetic_tower(Path(workdir))
        results = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                   "setting": {"model": args.model, "latent_size": args.latent_size, "steps": args.steps,
                               "reward": args.reward,
                               "batch_sizes": args.batch_sizes, "real": False, "overrides": args.override},
                   "cells": []}
        for method in args.methods:
            for dtype in args.dtypes:
                for checkpointing in args.checkpointing:
                    started = time.perf_counter()
                    results["cells"].append(run_child(args, method, dtype, checkpointing, real=False))
                    print(f"{method} {dtype} checkpointing {checkpointing}: "
                          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
                    if args.out:  # each cell as it comes: a long grid keeps what it measured
                        write_json(args.out, results)
        if args.check:
            real = {**results, "setting": {**results["setting"], "real": True},
                    "cells": [run_child(args, m, "fp32", "off", real=True) for m in args.methods]}
            results["check"] = real
    print(markdown(results))
    if args.check:
        print()
        print(markdown(results["check"]))
    if args.out:
        write_json(args.out, results)


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
