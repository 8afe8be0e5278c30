"""The Stable Diffusion 3 backend on a tiny random-weight pipeline saved in the real diffusers layout (offline)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import Interrupted, interrupt_after
from tiny_sd3 import (
    CLIP_DIMS,
    JOINT_DIM,
    LATENT_CHANNELS,
    LATENT_SIZE,
    SCALING_FACTOR,
    SHIFT,
    SHIFT_FACTOR,
    save_tiny_sd3,
)

from nablagfn.backends import build_backend
from nablagfn.backends.stable_diffusion_3 import LORA_TARGETS, StableDiffusion3Backend
from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.mdp import KERNEL_KINDS, FlowMatchKernel, FlowParameterization, FlowSDEKernel, rollout
from nablagfn.train.checkpoint import list_checkpoints
from nablagfn.train.run import Run, load_run
from nablagfn.train.trainer import Trainer

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "pipeline")


def overrides(pipeline_dir, *extra: str) -> list[str]:
    return [
        "model.kind=stable_diffusion_3",
        f"model.path={pipeline_dir}",
        "model.dtype=fp32",
        "model.gradient_checkpointing=false",  # on in the presets
        "model.flow_channels=[8,16]",
        "model.max_sequence_length=16",  # T5 tokens (diffusers' default 256): attention over fewer text tokens
        "reward.kind=brightness",
        "sampler.steps=3",
        *extra,
    ]


def make_backend(pipeline_dir, *extra: str) -> StableDiffusion3Backend:
    return build_backend(load_config(None, overrides(pipeline_dir, *extra)).model)


def latents(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=generator)


def perturb_lora(backend) -> None:
    """A non-trivial adapter (B ≠ 0), so the finetuned path differs from the pretrained one."""
    with torch.no_grad():
        for name, p in backend.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))


def base_weights(backend) -> dict[str, torch.Tensor]:
    trainable = {id(p) for p in backend.trainable_parameters()}
    return {name: p.detach().clone() for name, p in backend.named_parameters() if id(p) not in trainable}


def test_a_flow_model_with_lora_on_the_joint_attention_projections(pipeline_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = load_config(None, overrides(pipeline_dir))
    assert config.model.parameterization == "flow" and config.sampler.kind in KERNEL_KINDS["flow"]
    backend = build_backend(config.model)
    assert backend.sample_shape == (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE) and backend.schedule is None
    assert len(backend.prompts) == 45 and backend.prompts[:2] == ["cat", "dog"]
    parameterization = backend.parameterization  # T and shift read from the saved scheduler config
    assert isinstance(parameterization, FlowParameterization)
    assert (parameterization.num_train_timesteps, parameterization.shift) == (1000, SHIFT)

    adapted = {name for name, module in backend.named_modules() if isinstance(module, BaseTunerLayer)}
    expected = {f"transformer.transformer_blocks.{i}.attn.{target}" for i in range(2) for target in LORA_TARGETS}
    assert adapted == expected - {"transformer.transformer_blocks.1.attn.to_add_out"}  # the last block has none
    trainable = backend.trainable_parameters()
    names = {id(p): name for name, p in backend.named_parameters()}
    assert trainable and all("lora_" in names[id(p)] and p.requires_grad for p in trainable)
    assert all(p.dtype == torch.float32 for p in trainable)
    assert sum(p.requires_grad for p in backend.parameters()) == len(trainable)  # everything else is frozen
    assert set(backend.adapter_state_dict()) == {names[id(p)] for p in trainable}


def test_finetuned_is_pretrained_at_start_and_the_adapter_toggles(pipeline_dir):
    backend = make_backend(pipeline_dir)
    x, t, cond = latents(3), torch.tensor([1000.0, 612.5, 30.0]), torch.tensor([0, 5, 7])
    pretrained = backend.eps(x, t, cond, finetuned=False)
    torch.testing.assert_close(backend.eps(x, t, cond, finetuned=True), pretrained, rtol=0, atol=0)
    perturb_lora(backend)
    finetuned = backend.eps(x, t, cond, finetuned=True)
    assert (finetuned - pretrained).abs().max() > 1e-3
    torch.testing.assert_close(backend.eps(x, t, cond, finetuned=False), pretrained, rtol=0, atol=0)

    hook = backend.transformer.register_forward_hook(lambda *args: 1 / 0)  # the pretrained call raises
    with pytest.raises(ZeroDivisionError):
        backend.eps(x, t, cond, finetuned=False)
    hook.remove()
    torch.testing.assert_close(backend.eps(x, t, cond, finetuned=True), finetuned, rtol=0, atol=0)  # back on


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_classifier_free_guidance(pipeline_dir, guidance):
    backend = make_backend(pipeline_dir, f"model.guidance_scale={guidance}", "model.negative_prompt=blurry")
    perturb_lora(backend)
    x, t, cond = latents(2), torch.tensor([900.0, 250.0]), torch.tensor([3, 9])
    sizes: list[int] = []
    backend.transformer.register_forward_hook(
        lambda module, args, kwargs, output: sizes.append(len(kwargs["hidden_states"])), with_kwargs=True)
    velocity = backend.eps(x, t, cond)
    assert velocity.dtype == torch.float32 and velocity.shape == x.shape
    assert sizes == [2 if guidance == 1 else 4]  # one transformer call ([negative; prompt] when guided)

    def call(texts: list[str]) -> torch.Tensor:
        embeddings, _, pooled, _ = backend.pipeline.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                                                    max_sequence_length=16)
        return backend.transformer(hidden_states=x, encoder_hidden_states=embeddings, pooled_projections=pooled,
                                   timestep=t).sample

    with torch.no_grad():
        expected = conditional = call([backend.prompts[3], backend.prompts[9]])
        if guidance != 1:
            unconditional = call(["blurry", "blurry"])
            expected = unconditional + guidance * (conditional - unconditional)
    torch.testing.assert_close(velocity, expected, rtol=1e-4, atol=1e-5)


def test_the_grid_velocity_and_decoding_are_diffusers_sd3(pipeline_dir):
    """The kernel's σ grid and timesteps are the pipeline scheduler's after set_timesteps (shift 3); the Euler step
    (flow_sde with noise level 0) on the backend's guided velocity, then ``decode``, gives what
    StableDiffusion3Pipeline generates from the same noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    run = Run.build(load_config(None, overrides(pipeline_dir, "sampler.steps=4", "model.guidance_scale=4.5",
                                                "model.negative_prompt=blurry")))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")
    scheduler.set_timesteps(4)
    kernel = run.kernel
    assert isinstance(kernel, FlowMatchKernel)
    torch.testing.assert_close(kernel.state_sigmas, scheduler.sigmas.double(), rtol=0, atol=0)
    torch.testing.assert_close(kernel.state_timesteps[:-1], scheduler.timesteps, rtol=0, atol=0)
    # diffusers' grid: evenly spaced from 1 to its smallest training σ, then shifted: σ ↦ 3σ / (1 + 2σ)
    unshifted = torch.linspace(1.0, scheduler.sigma_min, 4, dtype=torch.float64)
    torch.testing.assert_close(kernel.sigma, SHIFT * unshifted / (1 + (SHIFT - 1) * unshifted), rtol=1e-6, atol=1e-7)

    backend, cond = run.backend, torch.tensor([0, 1])
    euler = FlowSDEKernel(4, noise_level=0.0, shift=SHIFT)
    ours = rollout(backend, euler, cond, torch.Generator().manual_seed(7), record=False)
    noise = torch.randn((2, *backend.sample_shape), generator=torch.Generator().manual_seed(7))  # rollout's first draw
    theirs = backend.pipeline([backend.prompts[0], backend.prompts[1]], negative_prompt="blurry", latents=noise,
                              num_inference_steps=4, guidance_scale=4.5, max_sequence_length=16, output_type="pt")
    torch.testing.assert_close(backend.decode(ours), theirs.images, rtol=1e-4, atol=1e-5)


def test_decode_applies_the_vae_scale_and_shift(pipeline_dir):
    backend = make_backend(pipeline_dir)
    x = latents(2).requires_grad_(True)
    image = backend.decode(x)
    assert image.shape == (2, 3, 2 * LATENT_SIZE, 2 * LATENT_SIZE) and image.dtype == torch.float32
    with torch.no_grad():
        raw = backend.vae.decode(x / SCALING_FACTOR + SHIFT_FACTOR).sample
    torch.testing.assert_close(image, ((raw + 1) / 2).clamp(0, 1))
    (grad,) = torch.autograd.grad(image.mean(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_t5_is_optional_and_each_prompt_is_encoded_once(pipeline_dir, tmp_path):
    backend = make_backend(pipeline_dir)
    encoded: list[int] = []
    backend.text_encoder_3.register_forward_hook(lambda module, args, output: encoded.append(len(args[0])))
    embeddings, pooled = backend.text_embeddings(torch.tensor([0, 1, 0, -1]))
    assert embeddings.shape == (4, 77 + 16, JOINT_DIM) and pooled.shape == (4, sum(CLIP_DIMS))
    assert (embeddings[:, 77:].abs().sum(dim=(1, 2)) > 0).all()  # T5's tokens after CLIP's 77
    backend.text_embeddings(torch.tensor([1, 1, -1]))
    assert encoded == [3]  # cat, dog and the negative prompt, in one call; then from the cache

    without = make_backend(pipeline_dir, "model.t5=false")  # as diffusers with text_encoder_3=None: zeros for T5
    assert without.text_encoder_3 is None
    no_t5, no_t5_pooled = without.text_embeddings(torch.tensor([0, 1, 0, -1]))
    assert torch.count_nonzero(no_t5[:, 77:]) == 0
    torch.testing.assert_close(no_t5[:, :77], embeddings[:, :77], rtol=0, atol=0)
    torch.testing.assert_close(no_t5_pooled, pooled, rtol=0, atol=0)

    saved_without = make_backend(save_tiny_sd3(tmp_path / "no_t5", t5=False))  # a pipeline that has none
    assert saved_without.text_encoder_3 is None
    assert torch.isfinite(saved_without.eps(latents(1), torch.tensor([500.0]), torch.tensor([2]))).all()


def test_from_a_pipeline_in_memory(pipeline_dir):
    """The LoRA goes on the pipeline's own transformer; model.t5=false leaves T5 out of the backend's view only."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir)
    backend = StableDiffusion3Backend.from_pipeline(pipe, ["a red fox", "a blue whale"], t5=False, lora_rank=2,
                                                    max_sequence_length=16)
    assert backend.transformer is pipe.transformer and backend.text_encoder_3 is None
    assert pipe.text_encoder_3 is not None and backend.prompts == ["a red fox", "a blue whale"]
    description = backend.describe()
    assert (description.kind, description.path, description.t5, description.lora_rank) == (
        "stable_diffusion_3", str(pipeline_dir), False, 2)
    assert torch.isfinite(backend.eps(latents(2), torch.tensor([900.0, 100.0]), torch.tensor([0, 1]))).all()


def test_base_weights_in_bf16_and_lora_in_fp32(pipeline_dir):
    backend = make_backend(pipeline_dir, "model.dtype=bf16")
    trainable = {id(p) for p in backend.trainable_parameters()}
    assert all(p.dtype == torch.float32 for p in backend.trainable_parameters())
    assert all(p.dtype == torch.bfloat16 for p in backend.parameters() if id(p) not in trainable)
    velocity = backend.eps(latents(2), torch.tensor([700.0, 20.0]), torch.tensor([0, 1]))
    image = backend.decode(latents(2))
    assert velocity.dtype == image.dtype == torch.float32
    assert torch.isfinite(velocity).all() and torch.isfinite(image).all()


def test_gradient_checkpointing_gives_the_same_gradients(pipeline_dir):
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A initialisation
        backend = make_backend(pipeline_dir, f"model.gradient_checkpointing={checkpointing}")
        assert backend.transformer.is_gradient_checkpointing == checkpointing
        perturb_lora(backend)
        x = latents(2).requires_grad_(True)
        t, cond = torch.tensor([800.0, 100.0]), torch.tensor([1, 2])
        loss = backend.eps(x, t, cond).square().mean() + backend.eps(x, t, cond, finetuned=False).mean()
        loss = loss + backend.decode(x).mean()
        gradients.append(torch.autograd.grad(loss, [x, *backend.trainable_parameters()]))
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)



def train_records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


def test_residual_nabla_db_trains_and_resumes_exactly(pipeline_dir, tmp_path):
    """Two updates from one epoch of 4 trajectories; a run stopped after logging update 2, before its checkpoint (so
    from the mid-epoch checkpoint of update 1), and resumed ends bitwise where the uninterrupted one does, with the
    same losses. Only the LoRA and g_φ change."""
    config = load_config(None, overrides(pipeline_dir, "method.beta=100", "train.trajectories_per_epoch=4",
                                         "train.batch_size=2", "train.updates=2", "train.checkpoint_every=1",
                                         "train.eval_samples=2", "train.eval_every=100"))
    assert config.method.name == "residual_nabla_db"
    straight = Trainer.from_config(config, tmp_path / "a", progress=False)
    backend = straight.run.backend
    base_before = base_weights(backend)
    lora_before = {k: v.clone() for k, v in backend.adapter_state_dict().items()}
    flow_before = {k: v.clone() for k, v in straight.run.method.networks.state_dict().items()}
    straight.train(write_outputs=False)
    assert all(torch.equal(base_before[k], v) for k, v in base_weights(backend).items())
    lora_after = backend.adapter_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    flow_after = straight.run.method.networks.state_dict()
    assert any(not torch.equal(flow_before[k], flow_after[k]) for k in flow_before)

    stopped = Trainer.from_config(config, tmp_path / "b", progress=False)
    interrupt_after(stopped, 2)
    with pytest.raises(Interrupted):
        stopped.train(write_outputs=False)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["update_0000001"]
    resumed = Trainer.from_config(config, tmp_path / "b", progress=False)
    resumed.train(resume=True, write_outputs=False)

    for name, value in resumed.run.backend.adapter_state_dict().items():
        assert torch.equal(value, lora_after[name]), name
    for name, value in resumed.run.method.networks.state_dict().items():
        assert torch.equal(value, flow_after[name]), name
    for group, optimizer in straight.optimizers.items():
        state, other = optimizer.state_dict()["state"], resumed.optimizers[group].state_dict()["state"]
        assert state.keys() == other.keys()
        assert all(torch.equal(torch.as_tensor(value), torch.as_tensor(other[index][key]))
                   for index in state for key, value in state[index].items())
    for shard, other in zip(straight.shards, resumed.shards, strict=True):
        assert torch.equal(shard.generator.get_state(), other.generator.get_state())
    straight_log, resumed_log = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r["update"] for r in resumed_log] == [1, 2]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]


def test_ddpo_trains_on_a_flow_samplers_log_probs(pipeline_dir, tmp_path):
    config = load_config(None, overrides(pipeline_dir, "method.name=ddpo", "train.trajectories_per_epoch=2",
                                         "train.batch_size=2", "train.updates=1", "train.eval_samples=2",
                                         "train.policy_optimizer.lr=0.05"))
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)
    trajectories = trainer.run.rollout(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert torch.isfinite(trajectories.log_probs).all() and trajectories.log_probs.shape == (2, 3)
    before = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    trainer.train(write_outputs=False)
    after = trainer.run.backend.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_records(tmp_path / "run"))


def test_cli_sample_and_export_round_trip_into_diffusers(pipeline_dir, tmp_path):
    """The exported LoRA, and the merged pipeline, generate in StableDiffusion3Pipeline what the finetuned run's
    velocity gives with the Euler step from the same noise; the LoRA moved it, so this is not the base model agreeing
    with itself."""
    from diffusers import StableDiffusion3Pipeline

    from nablagfn.cli import main

    run_dir = tmp_path / "run"
    train = overrides(pipeline_dir, "model.lora_rank=4", "model.lora_alpha=8", "model.t5=false", "train.updates=2",
                      "train.trajectories_per_epoch=2", "train.batch_size=2", "train.eval_samples=2",
                      "train.policy_optimizer.lr=0.05", "eval.prior_fid=false")
    Trainer.from_config(load_config(None, train), run_dir, progress=False).train(write_outputs=False)  # no figures
    assert main(["sample", str(run_dir), "--num", "2", "--out", str(tmp_path / "images")]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000.png", "00001.png"]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0

    run = load_run(run_dir)
    euler, cond = FlowSDEKernel(3, noise_level=0.0, shift=SHIFT), torch.zeros(2, dtype=torch.long)  # "cat"
    ours = rollout(run.backend, euler, cond, torch.Generator().manual_seed(7), record=False)
    base = rollout(run.backend, euler, cond, torch.Generator().manual_seed(7), finetuned=False, record=False)

    def generate(pipe) -> torch.Tensor:
        noise = torch.randn((2, *run.backend.sample_shape), generator=torch.Generator().manual_seed(7))
        return pipe(["cat"] * 2, latents=noise, num_inference_steps=3, max_sequence_length=16,
                    output_type="latent").images

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, text_encoder_3=None, tokenizer_3=None)
    plain = generate(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora = generate(pipe)
    assert not (tmp_path / "merged" / "text_encoder_3").exists()  # as trained
    merged = StableDiffusion3Pipeline.from_pretrained(tmp_path / "merged", text_encoder_3=None, tokenizer_3=None)
    assert (base - plain).abs().max() < 1e-5  # the samplers agree
    assert (ours - plain).abs().max() > 1e-2  # the LoRA matters
    assert (ours - with_lora).abs().max() < 1e-5
    assert (ours - generate(merged)).abs().max() < 1e-5
    card = (tmp_path / "lora" / "README.md").read_text()
    for fact in ("StableDiffusion3Pipeline", "rank 4, alpha 8", "updates: 2", "text_encoder_3=None", str(pipeline_dir)):
        assert fact in card


def test_config_presets_and_errors(pipeline_dir, tmp_path):
    config = load_config(None, ["model.kind=stable_diffusion_3"])
    assert config.reward.kind == "aesthetic" and (config.method.beta, config.method.output_reg) == (1e4, 1e3)
    assert config.sampler.kind in KERNEL_KINDS["flow"] and config.model.dtype == "fp32"
    assert (config.train.batch_size, config.train.accumulation, config.model.gradient_checkpointing) == (1, 32, True)
    assert config.model.path == "stabilityai/stable-diffusion-3-medium-diffusers" and config.model.guidance_scale == 7
    with pytest.raises(ConfigError, match=r"sampler\.kind: ddpm does not sample model\.parameterization=flow"):
        load_config(None, overrides(pipeline_dir, "sampler.kind=ddpm"))
    with pytest.raises(ConfigError, match=r"model\.parameterization"):
        load_config(None, overrides(pipeline_dir, "model.parameterization=eps"))

    with pytest.raises(ConfigError, match=r"model\.path.*not found"):
        make_backend(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model\.path.*lacks transformer"):
        make_backend(tmp_path / "half")
    with pytest.raises(ConfigError, match=r"model\.path.*HF_HUB_OFFLINE"):  # a hub id, with the hub off
        make_backend("nobody/no-such-pipeline")
    with pytest.raises(ConfigError, match=r"model\.lora_targets"):
        make_backend(pipeline_dir, "model.lora_targets=[no_such_layer]")
    dynamic = tmp_path / "dynamic"
    shutil.copytree(pipeline_dir, dynamic)
    scheduler = dynamic / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(ConfigError, match=r"model\.path: the scheduler .* use_dynamic_shifting=True"):
        make_backend(dynamic)
