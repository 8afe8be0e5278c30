"""What one update of each method costs: time, peak memory, and residual ∇-DB's overhead over its necessary passes.

Every figure is measured side by side in one invocation, so they can be compared on a noisy machine:

1. **Cost of one update** at the same number of trajectories for every method. The trainer samples an epoch of
   ``train.trajectories_per_epoch`` trajectories (only conditions for the methods that draw their own chains),
   then makes ``trajectories_per_epoch / (batch_size × accumulation)`` updates on it; one whole epoch (sampling +
   its updates, ``Trainer.sample_epoch`` + ``Trainer.update``) is timed and divided by its updates. After a
   warm-up epoch each, the methods take turns, round-robin with a rotating start, for ``--repeats`` epochs; the
   table holds medians, and each method's ratio to residual ∇-DB is the median of the ratios within a round.
2. **Peak memory of the training step**, in a fresh process per method. CPU: the resident-set high-water mark
   (``VmHWM``, which ``getrusage``'s ``ru_maxrss`` reports too), reset to the current resident set just before
   the step through ``/proc/self/clear_refs``, minus the resident set before it; glibc is told to give freed
   memory back at once (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``malloc_trim``) so that the
   resident set follows the live tensors. ``tracemalloc`` cannot do this: it sees only allocations made through
   Python's allocator, and torch's CPU tensors come from its own C++ allocator. CUDA:
   ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation before the step.
3. **Overhead of residual ∇-DB**: its update (plus its share of the epoch's sampling) against the passes it
   cannot avoid, each timed alone on the same minibatch of transitions: the policy forward + backward (finetuned
   ε on the trained transitions), the reference forward (pretrained ε), the reward-gradient passes (look-ahead
   x̂ → decode → reward → gradient back to the state, at x_k and x_{k+1}), the flow network g_φ forward + backward,
   and the rollout share. Then the anatomy of its loss: every stage in call order, with how many ε evaluations
   each makes, so repeated work shows.
4. **Time to reward**, read from a ``nablagfn compare`` report directory (each run's evaluations in training
   wall time): the first evaluation whose ``eval/log_reward_mean`` reaches ``--level``.

    python benchmarks/method_costs.py --model digits --repeats 3 --out costs_digits.json
    python benchmarks/method_costs.py --model sd-tiny --methods residual_nabla_db dag_db ddpo refl draft
    python benchmarks/method_costs.py --model digits --parts overhead --overhead-repeats 9
    python benchmarks/method_costs.py --device cuda --model digits             # on a GPU
    python benchmarks/method_costs.py --time-to-reward runs/compare-digits --level -1.0

Prints Markdown tables (the machine on top) and writes every number with ``--out``. Timings are asserted nowhere.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nablagfn.config_loading import load_config
from nablagfn.methods import METHODS, make_transitions, subsample_steps
from nablagfn.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "residual_nabla_db"
#: per model: config overrides (the same for every method) and a description for the table
MODELS: dict[str, tuple[list[str], str]] = {
    "digits": ([], "built-in 8×8 digits model, classifier reward (presets: 32 trajectories per epoch, 16 per update, "
                   "50-step DDPM)"),
    "sd-tiny": (["model.kind=stable_diffusion", "model.dtype=fp32", "model.flow_channels=[8,16]",
                 "reward.kind=brightness", "sampler.steps=20", "train.trajectories_per_epoch=8", "train.batch_size=4"],
                "tiny random-weight Stable Diffusion pipeline (tests/tiny_sd.py; 4×8×8 latents, 16×16 images, CFG 5), "
                "brightness reward, 8 trajectories per epoch, 4 per update, 20-step DDPM"),
    "gmm": (["model.kind=gmm"], "exact 2-D Gaussian mixture (8-mode ring), Gaussian reward, 256 trajectories per "
                               "epoch and per update, 50-step DDPM"),
    "sd15": (["model.kind=stable_diffusion", "reward.kind=brightness", "sampler.steps=4",
              "train.trajectories_per_epoch=2", "train.batch_size=1", "model.sample_batch_size=1"],
             "Stable Diffusion 1.5's architecture with random weights (benchmarks/sd15_architecture.py; UNet 860 M, "
             "VAE, CLIP ViT-L/14 text encoder; the reference code's flow UNet 64/128/256/256), CFG 5, brightness "
             "reward, 2 trajectories per epoch, 1 per update, 4-step DDPM (--latent-size: 64 is 512×512 images)"),
    "sd3": (["model.kind=stable_diffusion_3", "reward.kind=brightness", "sampler.steps=4",
             "train.trajectories_per_epoch=2", "train.batch_size=1", "model.sample_batch_size=1"],
            "Stable Diffusion 3 medium's architecture with random weights (benchmarks/sd3_architecture.py; MMDiT "
            "transformer 2 B, VAE, CLIP-L and CLIP-G text encoders, no T5), CFG, brightness reward, 2 trajectories per "
            "epoch, 1 per update, 4 flow sampler steps (flow_ddpm for residual ∇-DB, flow_sde for the others; "
            "--latent-size: 128 is 1024×1024 images)"),
}
PARTS = ("cost", "memory", "overhead")
MB = 2.0**20


# -- the machine and the clock ---------------------------------------------------------------------------------------
def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def clock(device: str) -> float:
    synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def quiet_collector():
    """No garbage-collector pause inside a timed block: the young generations are collected before it (a full
    collection takes ~1 s with torch and diffusers loaded), and the collector is off during it."""
    gc.collect(1)
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- runs --------------------------------------------------------------------------------------------------------------
def model_overrides(model: str, sd_path: str | None) -> list[str]:
    overrides = list(MODELS[model][0])
    if model in ("sd-tiny", "sd15", "sd3"):
        overrides.append(f"model.path={sd_path}")
    return overrides


def tiny_sd_pipeline(directory: Path, **options) -> str:
    """Write the tests' tiny random-weight pipeline (offline, < 1 s; ``options`` go to ``save_tiny_sd``, e.g.
    ``latent_size``) and return its directory."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_sd import save_tiny_sd

    return str(save_tiny_sd(directory / "tiny_sd", **options))


def make_trainer(model: str, method: str, device: str, extra: list[str], sd_path: str | None, workdir: Path) -> Trainer:
    # Flow-GRPO's groups must divide the epoch: the full-size models sample 2 trajectories per epoch
    groups = ["method.group_size=2"] if method == "flow_grpo" and model in ("sd15", "sd3") else []
    config = load_config(None, [*model_overrides(model, sd_path), f"method.name={method}", f"train.device={device}",
                                *groups, *extra])
    return Trainer.from_config(config, workdir / method, progress=False)


def updates_per_epoch(trainer: Trainer) -> int:
    train = trainer.config.train
    return train.trajectories_per_epoch // (train.batch_size * train.accumulation)


def one_update(trainer: Trainer) -> dict[str, float]:
    """One optimiser update as ``Trainer.train`` makes it (without logging, evaluation or checkpoints); its metrics."""
    return trainer.update()


def run_epoch(trainer: Trainer, device: str) -> dict:
    """Sample an epoch and make its updates; seconds of the sampling and of each update."""
    started = clock(device)
    trainer.sample_epoch()
    sampled = clock(device)
    updates = []
    while trainer.in_epoch:
        before = clock(device)
        one_update(trainer)
        updates.append(clock(device) - before)
    return {"sample": sampled - started, "updates": updates}


# -- 1. cost of one update -------------------------------------------------------------------------------------------
def measure_costs(trainers: dict[str, Trainer], repeats: int, device: str) -> dict:
    names = list(trainers)
    for name in names:  # warm-up: lazy initialisation, and the first epoch of off-policy training samples twice
        run_epoch(trainers[name], device)
    epochs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(repeats):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            with quiet_collector():
                epochs[name].append(run_epoch(trainers[name], device))
    per_update = {name: [(e["sample"] + sum(e["updates"])) / len(e["updates"]) for e in epochs[name]] for name in names}
    reference = REFERENCE if REFERENCE in names else names[0]
    rows = {}
    for name in names:
        trainer = trainers[name]
        rows[name] = {
            "per_update_s": median(per_update[name]),
            "rollout_share_s": median([e["sample"] / len(e["updates"]) for e in epochs[name]]),
            "update_alone_s": median([u for e in epochs[name] for u in e["updates"]]),
            "ratio_to_reference": median([a / b for a, b in zip(per_update[name], per_update[reference])]),
            "per_update_all_s": per_update[name],
            "updates_per_epoch": updates_per_epoch(trainer),
            "draws_own_chains": bool(trainer.run.method.draws_own_chains),
        }
    return {"reference": reference, "repeats": repeats, "rows": rows}


# -- 2. peak memory, one fresh process per method --------------------------------------------------------------------
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """The peak of a block above the memory in use before it (bytes), on the CPU or a CUDA device."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError as error:
                raise SystemExit(f"CPU peak memory needs Linux's /proc/self/clear_refs (writable): {error}") from None

    def in_use(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(torch.device(self.device))
        return _status_kb("VmRSS") * 1024

    @contextlib.contextmanager
    def peak(self, into: list[int]):
        _trim()
        synchronize(self.device)
        before = self.in_use()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM ← VmRSS
        yield
        synchronize(self.device)
        top = torch.cuda.max_memory_allocated(torch.device(self.device)) if self.cuda else _status_kb("VmHWM") * 1024
        into.append(top - before)


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: build the method's run, sample an epoch, make its updates; print the peaks as JSON."""
    meter = PeakMemory(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        _trim()
        base = meter.in_use()
        trainer = make_trainer(args.model, args.memory_child, args.device, args.override, args.sd_path, Path(workdir))
        _trim()
        built = meter.in_use()
        sampling: list[int] = []
        with meter.peak(sampling):
            trainer.sample_epoch()  # off-policy: the first epoch samples two (D_prev and D_curr)
        stored = meter.in_use()
        updates: list[int] = []
        while trainer.in_epoch:
            with meter.peak(updates):
                one_update(trainer)
    print(json.dumps({
        "process_after_imports_mb": base / MB, "run_built_mb": (built - base) / MB,
        "sampling_peak_mb": sampling[0] / MB, "resident_growth_after_sampling_mb": (stored - built) / MB,
        "update_peak_mb": max(updates) / MB, "first_update_peak_mb": updates[0] / MB,
        "update_peaks_mb": [u / MB for u in updates],
    }))


def measure_memory(args: argparse.Namespace, methods: list[str]) -> dict:
    rows = {}
    for name in methods:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name, "--model", args.model,
                   "--device", args.device, "--threads", str(args.threads), "--override", *args.override]
        if args.sd_path:
            command += ["--sd-path", args.sd_path]
        env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"memory measurement of {name} failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    how = ("torch.cuda.max_memory_allocated above the allocation before" if args.device.startswith("cuda") else
           "resident-set high-water mark (VmHWM, reset by /proc/self/clear_refs) above the resident set before; "
           f"glibc: {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}")
    return {"how": how, "rows": rows}


# -- 3. residual ∇-DB: overhead over its necessary passes, and the anatomy of its loss ---------------------------------
class Anatomy:
    """Wraps a run's ε, ε#-with-graph, look-ahead, reverse-target and g_φ calls to record, per top-level call of the
    loss, its label, time and the ε evaluations (on how many states) it makes."""

    LABELS = {  # (function, call number within the loss, or ε's kind) → what it is, in residual ∇-DB's loss
        ("eps", "finetuned"): "ε_θ(x_k) forward (policy, with graph)",
        ("eps", "pretrained"): "ε#(x_k) forward (reference, no grad)",
        ("pretrained_eps", 0): "ε#(x_k) forward, with its graph when differentiated below (reference)",
        ("predicted_log_reward_grad", 0): "look-ahead at x_{k+1}: ε#(x_{k+1}) fwd + decode + reward + bwd to x_{k+1}",
        ("predicted_log_reward_grad", 1): "look-ahead at x_k: [ε#(x_k) fwd +] decode + reward + bwd to x_k",
        ("reverse_residual_policy_score", 0): "reverse target J#(x_k)ᵀ v: [ε#(x_k) fwd +] bwd",
        ("flow_score", 0): "g_φ(x_{k+1}) forward (detached in the forward loss)",
        ("flow_score", 1): "g_φ(x_k) forward",
        ("flow_score", 2): "g_φ(x_K) forward (terminal loss)",
    }

    def __init__(self, run, device: str):
        self.run, self.device = run, device
        self.records: list[dict] = []
        self.depth = 0
        self.counts: dict[str, int] = {}
        self.eps_calls: list[tuple[str, bool, int]] = []
        targets = [(run.backend, "eps"), (run.method, "pretrained_eps"),
                   (run.method, "predicted_log_reward_grad"), (run.method, "reverse_residual_policy_score"),
                   (run.method, "flow_score")]
        self.originals = [(obj, name, getattr(obj, name)) for obj, name in targets if hasattr(obj, name)]

    def __enter__(self) -> "Anatomy":
        for obj, name, original in self.originals:
            setattr(obj, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, _ in self.originals:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)  # the instance attribute shadowed the class's method

    def reset(self) -> None:
        self.records, self.counts, self.eps_calls = [], {}, []

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            if name == "eps":
                finetuned = kwargs.get("finetuned", args[3] if len(args) > 3 else True)
                self.eps_calls.append(("finetuned" if finetuned else "pretrained", torch.is_grad_enabled(),
                                       int(args[0].shape[0])))
            if self.depth > 0:
                return original(*args, **kwargs)
            key = (name, self.eps_calls[-1][0]) if name == "eps" else (name, self.counts.get(name, 0))
            self.counts[name] = self.counts.get(name, 0) + 1
            first_eps = len(self.eps_calls) - (1 if name == "eps" else 0)
            self.depth += 1
            started = clock(self.device)
            try:
                return original(*args, **kwargs)
            finally:
                seconds = clock(self.device) - started
                self.depth -= 1
                calls = self.eps_calls[first_eps:]
                self.records.append({"label": self.LABELS.get(key, f"{name} #{key[1]}"), "seconds": seconds,
                                     "eps_evaluations": len(calls), "eps_states": sum(c[2] for c in calls)})
        return wrapped


def measure_overhead(trainer: Trainer, repeats: int, device: str) -> dict:
    """Residual ∇-DB's update against the passes it cannot avoid, each timed alone on one fixed minibatch, and the
    anatomy of its loss; all interleaved round-robin."""
    run, method, backend, kernel = trainer.run, trainer.run.method, trainer.run.backend, trainer.run.kernel
    train = trainer.config.train
    while trainer.in_epoch:  # finish the epoch under way
        one_update(trainer)
    trainer.sample_epoch()
    generator = torch.Generator().manual_seed(0)
    shard = trainer.shards[0]  # one process: one shard unless train.data_shards says otherwise
    trajectories = shard.data.select(shard.order[: trainer.shard_batch_size])
    subsample = method.config.subsample
    rows, steps = subsample_steps(len(trajectories), kernel.num_steps, subsample.kind, subsample.fraction, generator)
    batch = make_transitions(trajectories, rows, steps)
    x, x_next, step, cond = batch.state, batch.next_state, batch.step, batch.cond
    timestep = kernel.timestep_of_state(step)
    params = backend.trainable_parameters() + list(method.flow_score_net.parameters())
    per_epoch = updates_per_epoch(trainer)
    accumulation = train.accumulation

    def zero() -> None:
        for p in params:
            p.grad = None

    def update() -> None:  # the trainer's own optimiser step, on the epoch's first minibatch(es) every time (the
        trainer.epoch_position = 0  # public update() moves on through the epoch, which a repeated timing cannot)
        trainer._optimizer_step()

    def rollout() -> None:
        for each in trainer.shards:
            trainer._sample_shard(each)  # one shard's rollout, as sample_epoch() draws it

    def policy() -> None:
        backend.eps(x, timestep, cond, finetuned=True).square().mean().backward()
        zero()

    def reference() -> None:
        with torch.no_grad():
            backend.eps(x, timestep, cond, finetuned=False)

    def reward_gradient() -> None:  # the look-ahead ∇_x log R(x̂(x)) at both ends of each transition
        method.predicted_log_reward_grad(x_next, step + 1, cond, generator)
        method.predicted_log_reward_grad(x, step, cond, generator)

    def flow() -> None:  # g_φ at x_k (trained), x_{k+1} (a value) and x_K (terminal loss)
        here = method.flow_score(x, step, cond)
        with torch.no_grad():
            method.flow_score(x_next, step + 1, cond)
        final = method.flow_score(batch.final_state, torch.full_like(batch.final_cond, kernel.num_steps),
                                  batch.final_cond)
        (here.square().mean() + final.square().mean()).backward()
        zero()

    def reward_alone() -> None:  # decode + reward + backward to x̂ only: the look-ahead without its ε
        with torch.enable_grad():
            method.smoothed_log_reward(x.detach().requires_grad_(True), cond, generator).sum().backward()

    def pretrained_fwd_bwd() -> None:  # one VJP through ε#, as the reverse target and each look-ahead make
        kernel.mean_vjp(x, torch.ones_like(x), step, lambda inp: backend.eps(inp, timestep, cond, finetuned=False))

    anatomy = Anatomy(run, device)
    stage_times: dict[str, list[float]] = {}
    stage_info: dict[str, dict] = {}
    counting = {"on": False}

    def loss_anatomy() -> None:  # the loss with its stages timed, then its backward
        anatomy.reset()
        with anatomy:
            began = clock(device)
            loss, _ = method.loss(batch, generator)
            in_loss = clock(device) - began
        began = clock(device)
        loss.backward()
        backward = clock(device) - began
        zero()
        if not counting["on"]:
            return
        for record in anatomy.records:
            stage_times.setdefault(record["label"], []).append(record["seconds"])
            stage_info[record["label"]] = {k: record[k] for k in ("eps_evaluations", "eps_states")}
        stage_times.setdefault("rest of the loss (elementwise terms, Python)", []).append(
            in_loss - sum(r["seconds"] for r in anatomy.records))
        stage_times.setdefault("loss.backward() (policy and g_φ)", []).append(backward)
        stage_times.setdefault("loss + backward", []).append(in_loss + backward)

    passes = {"update": update, "rollout": rollout, "policy": policy, "reference": reference,
              "reward_gradient": reward_gradient, "flow": flow, "reward_alone": reward_alone,
              "pretrained_fwd_bwd": pretrained_fwd_bwd, "loss_anatomy": loss_anatomy}
    for function in passes.values():  # warm-up
        function()
    counting["on"] = True
    times: dict[str, list[float]] = {name: [] for name in passes}
    names = list(passes)
    for round_index in range(repeats):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            with quiet_collector():
                began = clock(device)
                passes[name]()
                times[name].append(clock(device) - began)
    seconds = {name: median(values) for name, values in times.items()}
    necessary = {
        "policy ε_θ forward + backward": accumulation * seconds["policy"],
        "reference ε# forward": accumulation * seconds["reference"],
        "reward-gradient passes (look-ahead at x_k and x_{k+1})": accumulation * seconds["reward_gradient"],
        "flow g_φ forward + backward": accumulation * seconds["flow"],
        "rollout share": seconds["rollout"] / per_epoch,
    }
    total = seconds["update"] + seconds["rollout"] / per_epoch
    loss_and_backward = median(stage_times.pop("loss + backward"))
    stages = [{"stage": label, "seconds": median(values), **stage_info.get(label, {})}
              for label, values in stage_times.items()]
    rest = ("rest of the update (subsampling, finite checks, clipping, AdamW: update − loss − backward, a difference "
            "of medians)")
    stages.append({"stage": rest, "seconds": seconds["update"] / accumulation - loss_and_backward})
    with anatomy:  # the ε evaluations of one loss
        anatomy.reset()
        method.loss(batch, generator)
        eps_calls = list(anatomy.eps_calls)
    zero()
    return {
        "transitions": int(x.shape[0]),
        "trajectories": len(trajectories),
        "updates_per_epoch": per_epoch,
        "seconds": seconds,
        "update_with_rollout_share_s": total,
        "necessary": necessary,
        "necessary_sum_s": sum(necessary.values()),
        "ratio": total / sum(necessary.values()),
        "ratio_without_rollout": seconds["update"] / (sum(necessary.values()) - necessary["rollout share"]),
        "stages": stages,
        "eps_calls_per_loss": [{"model": m, "grad": g, "states": n} for m, g, n in eps_calls],
        "states_in_eps_per_loss": sum(n for _, _, n in eps_calls),
    }


# -- 4. time to reward, from a `nablagfn compare` report --------------------------------------------------------------
def time_to_reward(report: Path, level: float) -> dict:
    from nablagfn.compare import discover_runs, read_run

    rows: dict[str, dict] = {}
    for spec in discover_runs(report):
        result = read_run(spec)
        reached = next((e for e in result.evaluations if e.get("eval/log_reward_mean", -float("inf")) >= level), None)
        row = rows.setdefault(spec.method, {"runs": 0, "reached": 0, "seconds": [], "updates": [], "state": [],
                                            "fd_to_class": []})
        row["runs"] += 1
        row["state"].append(result.state)
        if reached is not None:
            row["reached"] += 1
            row["seconds"].append(reached.get("update_time", reached["time"]))  # evaluations not counted
            row["updates"].append(reached["update"])
            if "eval/fd_to_class" in reached:  # digits: how close to the real class the run is there
                row["fd_to_class"].append(reached["eval/fd_to_class"])
    for row in rows.values():
        row["median_s"] = median(row["seconds"]) if row["seconds"] else None
        row["median_updates"] = median(row["updates"]) if row["updates"] else None
        row["median_fd_to_class"] = median(row["fd_to_class"]) if row["fd_to_class"] else None
    return {"report": str(report), "level": level, "rows": rows}


# -- output ----------------------------------------------------------------------------------------------------------
def machine_line(info: dict) -> str:
    """The ``machine`` record as one Markdown sentence."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    load = info.get("load_average_start"), info.get("load_average_end")
    load_text = f"; load average {load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end" if all(load) else ""
    return (f"Machine: {info['platform']} ({info['processor']}), {info['cpu_count']} CPUs, torch {info['torch']}, "
            f"{info['threads']} thread(s), device {info['device']}{gpu}, Python {info['python']}{load_text}.")


def markdown(results: dict) -> str:
    lines = [f"# Method costs: `{results['command']}`", "", machine_line(results["machine"])]
    if "model" in results:
        lines.append(f"Model `{results['model']}`: {MODELS[results['model']][1]}"
                     + (f"; overrides {' '.join(results['overrides'])}" if results["overrides"] else "") + ".")
    lines.append("")
    if "cost" in results:
        cost = results["cost"]
        lines += [f"## Cost of one update (median of {cost['repeats']} round-robin epochs)", "",
                  f"| method | s per update (incl. sampling share) | sampling share | update alone "
                  f"| × {cost['reference']} |",
                  "| --- | --- | --- | --- | --- |"]
        for name, row in cost["rows"].items():
            note = " (conditions only)" if row["draws_own_chains"] else ""
            lines.append(f"| {name} | {row['per_update_s']:.3f} | {row['rollout_share_s']:.3f}{note} | "
                         f"{row['update_alone_s']:.3f} | {row['ratio_to_reference']:.2f} |")
        lines.append("")
    if "memory" in results:
        memory = results["memory"]
        lines += ["## Peak memory (fresh process per method)", "", f"Measured as the {memory['how']}.", "",
                  "| method | run built (MB) | sampling an epoch, peak (MB) | kept after sampling (MB) "
                  "| update, peak (MB) |",
                  "| --- | --- | --- | --- | --- |"]
        for name, row in memory["rows"].items():
            lines.append(f"| {name} | {row['run_built_mb']:.1f} | {row['sampling_peak_mb']:.1f} | "
                         f"{row['resident_growth_after_sampling_mb']:.1f} | {row['update_peak_mb']:.1f} |")
        lines.append("")
    if "overhead" in results:
        o = results["overhead"]
        lines += [f"## Residual ∇-DB: overhead over its necessary passes ({o['trajectories']} trajectories → "
                  f"{o['transitions']} transitions per update, {o['updates_per_epoch']} updates per epoch)", "",
                  "| pass, timed alone on the same minibatch | s |", "| --- | --- |"]
        for name, value in o["necessary"].items():
            lines.append(f"| {name} | {value:.4f} |")
        lines += [f"| **sum of the necessary passes** | **{o['necessary_sum_s']:.4f}** |",
                  f"| **update + rollout share** | **{o['update_with_rollout_share_s']:.4f}** |",
                  f"| **ratio** | **{o['ratio']:.2f}** |",
                  f"| ratio without the rollout (update alone / necessary passes of the update) | "
                  f"{o['ratio_without_rollout']:.2f} |", "",
                  f"Unit costs on the same transitions: one VJP through the pretrained ε (fwd + bwd) "
                  f"{o['seconds']['pretrained_fwd_bwd']:.4f} s; decode + reward + backward to x̂ alone "
                  f"{o['seconds']['reward_alone']:.4f} s.", "",
                  "Anatomy of one update (the loss's stages in call order, then its backward):", "",
                  "| stage | ε evaluations (states) | s |", "| --- | --- | --- |"]
        for stage in o["stages"]:
            evals = f"{stage['eps_evaluations']} ({stage['eps_states']})" if "eps_evaluations" in stage else ""
            lines.append(f"| {stage['stage']} | {evals} | {stage['seconds']:.4f} |")
        calls = o["eps_calls_per_loss"]
        summary = {}
        for call in calls:
            key = f"{call['model']}{' with grad' if call['grad'] else ', no grad'}"
            summary[key] = summary.get(key, 0) + call["states"]
        lines += ["", "ε evaluated per loss on: " + ", ".join(f"{v} states ({k})" for k, v in summary.items())
                  + f"; {o['states_in_eps_per_loss']} in all for {o['transitions']} transitions.", ""]
    if "time_to_reward" in results:
        t = results["time_to_reward"]
        lines += [f"## Time to reward: first evaluation with mean log-reward ≥ {t['level']} (`{t['report']}`)", "",
                  "Seconds the run spent in its updates (sampling and gradient steps; evaluations and checkpoints "
                  "not counted, as the runs' `update_time` logs them; older runs: the training wall time, which "
                  "includes the earlier evaluations) up to that evaluation, median over the runs that reached the "
                  "level; a level is only seen at the runs' evaluations (`train.eval_every`).",
                  "", "| method | reached / runs | runs' states | median seconds | median updates "
                  "| median FD to the real class there |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, row in t["rows"].items():
            seconds = f"{row['median_s']:.0f}" if row["median_s"] is not None else "not reached"
            updates = f"{row['median_updates']:.0f}" if row["median_updates"] is not None else "—"
            fd = f"{row['median_fd_to_class']:.1f}" if row.get("median_fd_to_class") is not None else "—"
            states = ", ".join(f"{row['state'].count(s)} {s}" for s in dict.fromkeys(row["state"]))
            lines.append(f"| {name} | {row['reached']} / {row['runs']} | {states} | {seconds} | {updates} | {fd} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="digits")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="default: all 12")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                        help="what to measure (default: all three, or none with --time-to-reward)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="round-robin rounds of the update costs (epochs per method)")
    parser.add_argument("--overhead-repeats", type=int, default=7, help="round-robin rounds of the overhead passes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides for every method")
    parser.add_argument("--time-to-reward", type=Path, metavar="REPORT_DIR",
                        help="a `nablagfn compare --out` directory")
    parser.add_argument("--level", type=float, default=-1.0, help="the mean log-reward of --time-to-reward")
    parser.add_argument("--out", type=Path, help="write every number as JSON")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--sd-path", help="a pipeline directory for --model sd-tiny, sd15 or sd3 (default: written "
                        "afresh)")
    parser.add_argument("--latent-size", type=int, default=64, help="--model sd15 or sd3: the latent side (64: 512×512)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child:
        memory_child(args)
        return
    parts = args.parts if args.parts is not None else ([] if args.time_to_reward else list(PARTS))
    results: dict = {"command": " ".join(["python benchmarks/method_costs.py", *sys.argv[1:]]),
                     "machine": machine(args.device)}
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        if parts:
            if args.model == "sd-tiny" and not args.sd_path:
                args.sd_path = tiny_sd_pipeline(workdir)
            if args.model == "sd15" and not args.sd_path:
                from sd15_architecture import save_sd15

                args.sd_path = str(save_sd15(workdir / "sd15", args.latent_size, "fp16"))
            if args.model == "sd3" and not args.sd_path:
                from sd3_architecture import save_sd3

                args.sd_path = str(save_sd3(workdir / "sd3", args.latent_size, "fp16"))
            results.update(model=args.model, overrides=args.override, methods=args.methods)
            methods = list(args.methods)
            if "overhead" in parts and REFERENCE not in methods:
                methods.insert(0, REFERENCE)
            trainers = {name: make_trainer(args.model, name, args.device, args.override, args.sd_path, workdir)
                        for name in methods if "cost" in parts or name == REFERENCE}
            if "cost" in parts:
                results["cost"] = measure_costs({n: t for n, t in trainers.items() if n in args.methods},
                                                args.repeats, args.device)
            if "overhead" in parts:
                results["overhead"] = measure_overhead(trainers[REFERENCE], args.overhead_repeats, args.device)
            del trainers
            if "memory" in parts:
                results["memory"] = measure_memory(args, args.methods)
        if args.time_to_reward:
            results["time_to_reward"] = time_to_reward(args.time_to_reward, args.level)
    publish(results, markdown, args.out)


def publish(results: dict, render: Callable[[dict], str], out: Path | None) -> None:
    """Note the load average at the end, print ``render(results)`` and write the JSON to ``out``."""
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(render(results))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
