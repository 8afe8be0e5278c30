"""A finetuned Stable Diffusion (1.x/2.x or 3) or FLUX run out to diffusers: the LoRA adapter, or a full pipeline with it fused.

``export_lora(run_dir, out)`` writes ``pytorch_lora_weights.safetensors`` in the format the pipeline's
``load_lora_weights(out)`` reads (``StableDiffusionPipeline``: the UNet's peft keys converted as diffusers' own
training scripts do; ``StableDiffusion3Pipeline``: the transformer's peft keys, as diffusers' SD3 LoRA script saves
them; either with the adapter's rank and alpha as metadata); with ``merge=True`` it writes the base pipeline with the
LoRA fused into its UNet or transformer (``save_pretrained``; load it with the pipeline's ``from_pretrained``).
Either way ``README.md`` is a short model card: base model, reward, β, method, updates, final metrics.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import torch
import yaml

from .errors import ConfigError
from .train.run import Run, load_run

#: the file diffusers' ``load_lora_weights`` looks for in a directory
LORA_FILE = "pytorch_lora_weights.safetensors"
#: model.kind → the diffusers pipeline class its LoRA loads into
PIPELINES = {"stable_diffusion": "StableDiffusionPipeline", "stable_diffusion_3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}


def export_lora(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None, merge: bool = False,
                run: Run | None = None) -> Path:
    """Write a run's LoRA (or, with ``merge``, the pipeline with it fused) to ``out`` for diffusers.

    Args:
        run_dir: a ``stable_diffusion``, ``stable_diffusion_3`` or ``flux`` run directory.
        out: the directory to write (created; files of the same names are replaced).
        checkpoint: the checkpoint to export (default: the run's latest).
        merge: write a full pipeline with the LoRA fused instead of the adapter alone.
        run: the run already loaded (``load_run``), e.g. with a pipeline handed over in Python; by default the run is
            loaded on the CPU, so a run trained on a GPU exports on any machine.

    Returns:
        ``out``.
    """
    run_dir, out = Path(run_dir), Path(out)
    if run is None:
        config = _read_config(run_dir)
        if config.get("model", {}).get("kind") not in PIPELINES:
            raise ConfigError(f"{run_dir}: export writes a diffusers LoRA, which needs model.kind=stable_diffusion, "
                              f"stable_diffusion_3 or flux (this run has model.kind={config.get('model', {}).get('kind')})")
        run = _load_for_export(run_dir, checkpoint, config)
    from .backends.stable_diffusion import StableDiffusionBackend
    from .backends.stable_diffusion_3 import StableDiffusion3Backend

    if not isinstance(run.backend, (StableDiffusionBackend, StableDiffusion3Backend)):
        raise ConfigError(f"{run_dir}: export writes a diffusers LoRA, which needs a Stable Diffusion run")
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        with tempfile.TemporaryDirectory(dir=out) as adapter_dir:
            save_adapter(run, Path(adapter_dir))
            _save_merged(run, Path(adapter_dir), out)
    else:
        save_adapter(run, out)
    (out / "README.md").write_text(model_card(run, run_dir, merge))
    return out


def save_adapter(run: Run, out: Path) -> Path:
    """The UNet's (or SD3 transformer's) LoRA of ``run`` as diffusers saves one (``save_lora_weights``), with its
    rank and alpha."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipeline = getattr(diffusers, PIPELINES[run.config.model.kind])
    if run.config.model.kind in ("stable_diffusion_3", "flux"):  # peft keys, as diffusers' SD3/FLUX LoRA scripts save them
        model, component = run.backend.transformer, "transformer"
        layers = get_peft_model_state_dict(model)
    else:
        model, component = run.backend.unet, "unet"
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    layers = {name: tensor.detach().float().cpu().contiguous() for name, tensor in layers.items()}
    options = {}
    lora = model.peft_config["default"]
    if f"{component}_lora_adapter_metadata" in inspect.signature(pipeline.save_lora_weights).parameters:
        options[f"{component}_lora_adapter_metadata"] = lora.to_dict()  # rank and alpha, read by load_lora_weights
    elif lora.lora_alpha != lora.r:
        raise ConfigError(f"model.lora_alpha: this diffusers cannot record alpha ({lora.lora_alpha}) ≠ rank ({lora.r}) "
                          "with the LoRA; upgrade diffusers (≥ 0.35) to export it")
    pipeline.save_lora_weights(out, safe_serialization=True, **{f"{component}_lora_layers": layers}, **options)
    return out / LORA_FILE


def _save_merged(run: Run, adapter_dir: Path, out: Path) -> None:
    """The base pipeline of ``run`` (``model.path``, the run's dtype; without T5 if the run had none) with the adapter
    fused, saved to ``out``."""
    import diffusers

    from .backends.stable_diffusion import DTYPES

    model = run.config.model
    dtype = DTYPES[model.dtype]
    if model.kind == "stable_diffusion_3":
        from .backends.stable_diffusion_3 import load_pipeline

        pipe = load_pipeline(model.path, model.revision, torch.float32, model.t5)
    elif model.kind == "flux":
        from .backends.flux import load_pipeline as load_flux_pipeline

        pipe = load_flux_pipeline(model.path, model.revision, torch.float32)
    else:
        try:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(model.path, revision=model.revision,
                                                                     safety_checker=None,
                                                                     requires_safety_checker=False)  # fp32
        except OSError as error:
            raise ConfigError(f"model.path: cannot load the base pipeline {model.path!r} to merge into ({error})"
                              ) from None
    pipe.load_lora_weights(adapter_dir, adapter_name="nablagfn")
    pipe.fuse_lora(adapter_names=["nablagfn"])  # in fp32, then cast to the run's dtype
    pipe.unload_lora_weights()
    pipe.to(dtype).save_pretrained(out, safe_serialization=True)


def model_card(run: Run, run_dir: Path, merged: bool) -> str:
    """A short README.md: what the weights are, how they were trained, their final metrics and how to load them."""
    config = run.config
    method = config.method
    beta = getattr(method, "beta", None)
    name = run.checkpoint.name.removeprefix("update_") if run.checkpoint is not None else "?"
    updates = int(name) if name.isdigit() else name
    eval_path = run_dir / "eval.json"
    metrics = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    lines = [
        f"# nablagfn {'pipeline (LoRA fused)' if merged else 'LoRA'}: {method.name} on {config.model.path}",
        "",
        f"- base model: `{config.model.path}`" + (f" (revision {config.model.revision})" if config.model.revision else ""),
        f"- reward: `{config.reward.kind}`" + (f" (`{config.reward.function}`)" if config.reward.kind == "python" else ""),
        f"- method: `{method.name}`" + (f", β = {beta:g}" if beta is not None else "")
        + (f", η = {method.prior_strength:g}" if hasattr(method, "prior_strength") else ""),
        f"- updates: {updates} (checkpoint `{run.checkpoint}`)",
        f"- sampler: {config.sampler.kind}, {config.sampler.steps} steps; guidance scale {config.model.guidance_scale:g}",
        f"- LoRA: rank {config.model.lora_rank}, alpha {config.model.lora_alpha or config.model.lora_rank:g}, "
        f"on {', '.join(config.model.lora_targets)}",
    ]
    if metrics:
        lines += ["", "Final evaluation (`eval.json`):", ""]
        lines += [f"- {key}: {value:.4g}" for key, value in metrics.items() if isinstance(value, (int, float))]
    pipeline = PIPELINES[config.model.kind]
    no_t5 = config.model.kind == "stable_diffusion_3" and run.backend.text_encoder_3 is None
    without_t5 = ", text_encoder_3=None, tokenizer_3=None" if no_t5 else ""
    load = (f"pipe = {pipeline}.from_pretrained(DIR{without_t5})" if merged else
            f"pipe = {pipeline}.from_pretrained({config.model.path!r}{without_t5})\npipe.load_lora_weights(DIR)")
    if no_t5:
        lines += ["", "Trained without the T5 text encoder (`model.t5: false`, or a base pipeline without one): load "
                  "the pipeline without it, as below."]
    lines += ["", "Load with diffusers:", "", "```python", f"from diffusers import {pipeline}", load, "```", ""]
    return "\n".join(lines)


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return yaml.safe_load(path.read_text()) or {}


def _load_for_export(run_dir: Path, checkpoint: str | Path | None, config: dict) -> Run:
    """The run, rebuilding a model handed over in Python from its recorded ``model.path`` (export needs only the
    UNet's shapes and, to merge, the base weights) and a handed-over reward as a stand-in (export does not use it)."""
    from .backends import build_backend
    from .config_loading import validate_config
    from .rewards.simple import BrightnessReward

    handed_over = config.get("handed_over", [])
    if not handed_over:
        return load_run(run_dir, checkpoint, device="cpu")
    parsed = validate_config(config)
    backend = build_backend(parsed.model) if "model" in handed_over else None
    reward = BrightnessReward() if "reward" in handed_over else None
    return load_run(run_dir, checkpoint, backend=backend, reward=reward, device="cpu")
