"""Pretraining of the built-in digits models (``nablagfn pretrain digits|digits-flow|classifier``), seeded and
reproducible.

The package ships the results (``nablagfn/data/*.safetensors``); these functions
rebuild them. All train on CPU in minutes.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from .backends.digits import DigitsUNet, digits_schedule, digits_split, load_digits_dataset
from .mdp.parameterization import FlowParameterization
from .rewards.classifier import DigitClassifier


def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total)))


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one CPU thread inside (a sum split over several threads rounds differently, so trained weights would
    depend on the machine's core count); also a decorator."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_with_ema(
    model: nn.Module, loss_of_next_batch: Callable[[], Tensor], steps: int, lr: float, ema: float, description: str,
    progress: bool,
) -> tuple[nn.Module, float, float]:
    """The digits models' training loop: AdamW (weight decay 1e-4), gradients clipped at norm 1, cosine lr, an EMA of
    the weights. ``loss_of_next_batch()`` draws a batch and returns its loss. Returns (EMA model, smoothed final
    loss, seconds)."""
    averaged = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    started, running = time.perf_counter(), None
    bar = tqdm(range(steps), desc=description, disable=not progress, mininterval=1.0)
    for step in bar:
        loss = loss_of_next_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        _cosine_lr(optimizer, lr, step, steps)
        optimizer.step()
        with torch.no_grad():
            for target, source in zip(averaged.parameters(), model.parameters()):
                target.lerp_(source, 1 - ema)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    return averaged, running, time.perf_counter() - started


def _save_weights(model: nn.Module, out: Path, metadata: dict[str, str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=metadata)


def pretrain_digits(
    out: Path, steps: int = 4000, batch_size: int = 128, lr: float = 2e-3, ema: float = 0.999, seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """ε-prediction DDPM training (uniform t, MSE) on all 1,797 digits scaled to [−1, 1]; saves the EMA weights."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, _ = load_digits_dataset()
    data = images * 2 - 1
    abar = digits_schedule().alphas_cumprod.float()

    def loss_of_next_batch() -> Tensor:
        index = torch.randint(0, len(data), (batch_size,), generator=generator)
        timestep = torch.randint(0, len(abar), (batch_size,), generator=generator)
        noise = torch.randn(data[index].shape, generator=generator)
        a = abar[timestep][:, None, None, None]
        noisy = a.sqrt() * data[index] + (1 - a).sqrt() * noise
        return (model(noisy, timestep) - noise).pow(2).mean()

    model = DigitsUNet()
    averaged, running, seconds = _train_with_ema(model, loss_of_next_batch, steps, lr, ema, "pretrain digits", progress)
    metadata = {"steps": str(steps), "batch_size": str(batch_size), "lr": str(lr), "ema": str(ema), "seed": str(seed)}
    _save_weights(averaged, out, metadata)
    return {"final_loss": running, "seconds": seconds}


@_one_thread()
def pretrain_digits_flow(
    out: Path, steps: int = 4000, batch_size: int = 128, lr: float = 2e-3, ema: float = 0.999, seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Rectified-flow training on all 1,797 digits scaled to [−1, 1]; saves the EMA weights.

    Conditional flow matching with the linear interpolant (Liu et al. 2023; Lipman et al. 2023):
    x_σ = (1 − σ) x₀ + σ ε, loss ‖v_θ(x_σ, 1000·σ) − (ε − x₀)‖² (``FlowParameterization``), one σ per sample,
    **uniform** on [0, 1). Uniform rather than SD3's logit-normal: it trains the ends of the path that the 50-step
    samplers visit (σ = 1 at the first step, small σ at the last), and on these 8×8 digits it did slightly better:
    FD to the real digits 1.77 / 1.85 / 1.78 against 1.92 / 2.16 / 1.92 for logit-normal(0, 1) (flow_sde at noise
    level 0.7 / 0.3, flow_ddpm; 50 steps, 2,000 samples, mean of 3 sampling seeds;
    ``benchmarks/digits_prior_quality.py``). Same optimiser, schedule and EMA as ``pretrain_digits``.

    Runs on one CPU thread and writes its settings as one metadata entry (safetensors orders several entries at
    random), so the same arguments rebuild the shipped file byte for byte.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, _ = load_digits_dataset()
    data = images * 2 - 1
    flow = FlowParameterization()

    def loss_of_next_batch() -> Tensor:
        clean = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        sigma = torch.rand(batch_size, generator=generator)
        timestep = sigma * flow.num_train_timesteps
        noise = torch.randn(clean.shape, generator=generator)
        return (model(flow.noise(clean, noise, timestep), timestep) - flow.training_target(clean, noise)).pow(2).mean()

    model = DigitsUNet()
    averaged, running, seconds = _train_with_ema(model, loss_of_next_batch, steps, lr, ema, "pretrain digits-flow",
                                                 progress)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "ema": ema, "seed": seed, "sigma": "uniform"}
    _save_weights(averaged, out, {"pretrain_digits_flow": json.dumps(settings, sort_keys=True)})
    return {"final_loss": running, "seconds": seconds}


def pretrain_classifier(
    out: Path, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, progress: bool = True
) -> dict[str, float]:
    """Cross-entropy training on 80 % of the digits (1-pixel shifts and light noise as augmentation);
    reports accuracy on the held-out 20 %."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_dataset()
    train, held_out = digits_split(len(images), seed=0)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain classifier", disable=not progress, mininterval=1.0)
    for step in bar:
        index = train[torch.randint(0, len(train), (batch_size,), generator=generator)]
        batch = images[index]
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
        batch = torch.roll(batch, shifts=shift, dims=(2, 3))
        batch = (batch + 0.05 * torch.randn(batch.shape, generator=generator)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _cosine_lr(optimizer, lr, step, steps)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"steps": str(steps), "seed": str(seed), "held_out_accuracy": f"{accuracy:.4f}"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=metadata)
    return {"held_out_accuracy": accuracy, "seconds": time.perf_counter() - started}
