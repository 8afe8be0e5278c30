"""The FLUX backend on a tiny random-weight FLUX.1 pipeline saved in the real diffusers layout (offline): the packed
velocity, the guidance embedding and the dynamic-shift grid against FluxPipeline, training with exact resume, and the
LoRA's export into FluxPipeline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Interrupted, interrupt_after
from tiny_flux import RESOLUTION, save_tiny_flux

from nablagfn.backends import build_backend
from nablagfn.backends.flux import FluxBackend
from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.mdp import FlowSDEKernel, rollout
from nablagfn.train.run import Run, load_run
from nablagfn.train.trainer import Trainer

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "pipeline")


def overrides(pipeline_dir, *extra: str) -> list[str]:
    return ["model.kind=flux", f"model.path={pipeline_dir}", "model.dtype=fp32", f"model.resolution={RESOLUTION}",
            "model.gradient_checkpointing=false", "model.flow_channels=[8,16]", "model.max_sequence_length=16",
            "reward.kind=brightness", "sampler.steps=3", *extra]



def perturb_lora(backend) -> None:
    with torch.no_grad():
        for name, p in backend.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_sampling_is_fluxpipelines_and_the_adapter_toggles(pipeline_dir, tmp_path, guidance_embeds):
    """The Euler step (flow_sde at noise level 0) on the backend's velocity, from the same noise, gives what
    FluxPipeline generates (packing, RoPE ids, timestep / 1000, the guidance embedding, FLUX's dynamic-shift grid);
    with the adapter on the velocity changes, with it off it is the pretrained one."""
    path = pipeline_dir if guidance_embeds else save_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    run = Run.build(load_config(None, overrides(path, "sampler.steps=4", "model.guidance_scale=2.5")))
    backend = run.backend
    assert isinstance(backend, FluxBackend) and backend.sample_shape == (4, 8, 8)
    assert run.kernel.mu == backend.parameterization.mu and run.kernel.mu is not None
    cond = torch.tensor([0, 1])
    euler = FlowSDEKernel(4, noise_level=0.0, mu=backend.parameterization.mu)
    torch.testing.assert_close(euler.state_sigmas, run.kernel.state_sigmas)
    ours = rollout(backend, euler, cond, torch.Generator().manual_seed(7), record=False)
    noise = torch.randn((2, *backend.sample_shape), generator=torch.Generator().manual_seed(7))
    packed = backend.pipeline._pack_latents(noise, 2, *backend.sample_shape)
    theirs = backend.pipeline([backend.prompts[0], backend.prompts[1]], latents=packed, height=RESOLUTION,
                              width=RESOLUTION, num_inference_steps=4, guidance_scale=2.5, max_sequence_length=16,
                              output_type="pt")
    torch.testing.assert_close(backend.decode(ours), theirs.images, rtol=1e-4, atol=1e-5)

    x, t = torch.randn((2, *backend.sample_shape), generator=torch.Generator().manual_seed(3)), torch.tensor(600.0)
    pretrained = backend.eps(x, t, cond, finetuned=False)
    torch.testing.assert_close(backend.eps(x, t, cond), pretrained)  # B = 0 at the start
    perturb_lora(backend)
    assert (backend.eps(x, t, cond) - pretrained).abs().max() > 1e-3
    torch.testing.assert_close(backend.eps(x, t, cond, finetuned=False), pretrained)
    other_guidance = Run.build(load_config(None, overrides(path, "model.guidance_scale=6"))).backend
    moved = (other_guidance.eps(x, t, cond, finetuned=False) - pretrained).abs().max()
    assert (moved > 1e-4) == guidance_embeds  # schnell has no guidance embedding


def test_residual_nabla_db_trains_and_resumes_exactly(pipeline_dir, tmp_path):
    config = load_config(None, overrides(pipeline_dir, "method.beta=100", "train.trajectories_per_epoch=4",
                                         "train.batch_size=2", "train.updates=2", "train.checkpoint_every=1",
                                         "train.eval_samples=2", "train.eval_every=100"))
    assert config.sampler.kind == "flow_ddpm" and config.method.gamma == "one"
    straight = Trainer.from_config(config, tmp_path / "a", progress=False)
    lora_before = {k: v.clone() for k, v in straight.run.backend.adapter_state_dict().items()}
    straight.train(write_outputs=False)
    lora_after = straight.run.backend.adapter_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)

    stopped = Trainer.from_config(config, tmp_path / "b", progress=False)
    interrupt_after(stopped, 2)
    with pytest.raises(Interrupted):
        stopped.train(write_outputs=False)
    resumed = Trainer.from_config(config, tmp_path / "b", progress=False)
    resumed.train(resume=True, write_outputs=False)
    for name, value in resumed.run.backend.adapter_state_dict().items():
        assert torch.equal(value, lora_after[name]), name
    for name, value in resumed.run.method.networks.state_dict().items():
        assert torch.equal(value, straight.run.method.networks.state_dict()[name]), name
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for d in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_cli_sample_and_export_round_trip_into_fluxpipeline(pipeline_dir, tmp_path):
    """The exported LoRA, and the merged pipeline, generate in FluxPipeline what the finetuned run gives."""
    from diffusers import FluxPipeline

    from nablagfn.cli import main

    run_dir = tmp_path / "run"
    train = overrides(pipeline_dir, "model.lora_rank=4", "model.lora_alpha=8", "train.updates=2",
                      "train.trajectories_per_epoch=2", "train.batch_size=2", "train.eval_samples=2",
                      "train.policy_optimizer.lr=0.05", "eval.prior_fid=false")
    Trainer.from_config(load_config(None, train), run_dir, progress=False).train(write_outputs=False)
    assert main(["sample", str(run_dir), "--num", "2", "--out", str(tmp_path / "images")]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000.png", "00001.png"]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0

    run = load_run(run_dir)
    mu, cond = run.backend.parameterization.mu, torch.zeros(2, dtype=torch.long)  # "cat"
    euler = FlowSDEKernel(3, noise_level=0.0, mu=mu)
    ours = rollout(run.backend, euler, cond, torch.Generator().manual_seed(7), record=False)

    def generate(pipe) -> torch.Tensor:
        noise = torch.randn((2, *run.backend.sample_shape), generator=torch.Generator().manual_seed(7))
        images = pipe(["cat"] * 2, latents=pipe._pack_latents(noise, 2, *run.backend.sample_shape), height=RESOLUTION,
                      width=RESOLUTION, num_inference_steps=3, max_sequence_length=16, output_type="latent").images
        return pipe._unpack_latents(images, RESOLUTION, RESOLUTION, pipe.vae_scale_factor)

    pipe = FluxPipeline.from_pretrained(pipeline_dir)
    plain = generate(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    assert (ours - plain).abs().max() > 1e-2  # the LoRA matters
    assert (ours - generate(pipe)).abs().max() < 1e-5
    assert (ours - generate(FluxPipeline.from_pretrained(tmp_path / "merged"))).abs().max() < 1e-5
    assert "FluxPipeline" in (tmp_path / "lora" / "README.md").read_text()


def test_config_presets_and_errors(pipeline_dir, tmp_path):
    config = load_config(None, ["model.kind=flux"])
    assert config.reward.kind == "aesthetic" and config.model.path == "black-forest-labs/FLUX.1-dev"
    assert (config.model.guidance_scale, config.model.resolution, config.model.max_sequence_length) == (3.5, 1024, 512)
    assert (config.train.batch_size, config.model.gradient_checkpointing, config.sampler.kind) == (1, True, "flow_ddpm")
    with pytest.raises(ConfigError, match=r"model\.negative_prompt: FLUX is guidance-distilled"):
        load_config(None, overrides(pipeline_dir, "model.negative_prompt=blurry"))
    with pytest.raises(ConfigError, match=r"sampler\.kind: ddpm does not sample"):
        load_config(None, overrides(pipeline_dir, "sampler.kind=ddpm"))
    with pytest.raises(ConfigError, match=r"model\.resolution: 18 is not a multiple of 4"):
        build_backend(load_config(None, overrides(pipeline_dir, "model.resolution=18")).model)
    with pytest.raises(ConfigError, match=r"model\.path.*lacks transformer"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "model_index.json").write_text("{}")
        build_backend(load_config(None, overrides(tmp_path / "half")).model)
    with pytest.raises(ConfigError, match=r"model\.path.*HF_HUB_OFFLINE"):
        build_backend(load_config(None, overrides("nobody/no-such-pipeline")).model)


def test_example_flux_from_pipeline(pipeline_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(root / "examples" / "flux_from_pipeline.py"), "--pipeline",
                             str(pipeline_dir), "--resolution", str(RESOLUTION), "--updates", "2", "--steps", "3",
                             "--trajectories", "2", "--out", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FluxPipeline with the exported LoRA: 2 images" in result.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["handed_over"] == ["model", "reward"] and saved["model"]["kind"] == "flux"
