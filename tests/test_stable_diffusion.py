"""The Stable Diffusion backend on a tiny random-weight pipeline saved in the real diffusers layout (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_sd import LATENT_CHANNELS, LATENT_SIZE, save_tiny_sd

from nablagfn.backends import build_backend
from nablagfn.backends.prompts import read_prompts, split_held_out
from nablagfn.backends.stable_diffusion import StableDiffusionBackend
from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.train.checkpoint import list_checkpoints
from nablagfn.train.run import Run
from nablagfn.train.trainer import Trainer, load_weights

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


def overrides(pipeline_dir, *extra: str) -> list[str]:
    return [
        "model.kind=stable_diffusion",
        f"model.path={pipeline_dir}",
        "model.dtype=fp32",
        "model.flow_channels=[8,16]",
        "reward.kind=brightness",
        "sampler.steps=3",
        *extra,
    ]


def make_backend(pipeline_dir, *extra: str) -> StableDiffusionBackend:
    return build_backend(load_config(None, overrides(pipeline_dir, *extra)).model)


def latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        (batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=torch.Generator().manual_seed(seed)
    )


def lora_b(backend) -> list[torch.Tensor]:
    return [p for name, p in backend.unet.named_parameters() if "lora_B" in name]


def base_weights(backend) -> dict[str, torch.Tensor]:
    trainable = {id(p) for p in backend.trainable_parameters()}
    return {name: p.detach().clone() for name, p in backend.named_parameters() if id(p) not in trainable}


def test_loads_from_pipeline_directory(pipeline_dir):
    backend = make_backend(pipeline_dir)
    assert isinstance(backend, StableDiffusionBackend)
    assert backend.sample_shape == (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    assert len(backend.prompts) == 45 and backend.prompts[:2] == ["cat", "dog"]
    # SD 1.5's scaled-linear schedule, read from the saved PNDM scheduler config
    assert backend.schedule.num_train_timesteps == 1000
    assert backend.schedule.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085)
    trainable = backend.trainable_parameters()
    names = {id(p): name for name, p in backend.named_parameters()}
    assert trainable and all("lora_" in names[id(p)] and p.requires_grad for p in trainable)
    assert sum(p.requires_grad for p in backend.parameters()) == len(trainable)  # everything else is frozen
    assert set(backend.adapter_state_dict()) == {names[id(p)] for p in trainable}


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_base_weights_in_model_dtype_and_lora_in_fp32(pipeline_dir, dtype, torch_dtype):
    backend = make_backend(pipeline_dir, f"model.dtype={dtype}")
    trainable = {id(p) for p in backend.trainable_parameters()}
    assert all(p.dtype == torch.float32 for p in backend.trainable_parameters())
    assert all(p.dtype == torch_dtype for p in backend.parameters() if id(p) not in trainable)
    if dtype == "bf16":  # CPU kernels exist for bf16: ε and images come back finite in fp32
        x = latents(2)
        eps = backend.eps(x, torch.tensor([500, 20]), torch.tensor([0, 1]))
        image = backend.decode(x)
        assert eps.dtype == image.dtype == torch.float32
        assert torch.isfinite(eps).all() and torch.isfinite(image).all()


def test_adapter_starts_at_zero_and_toggles(pipeline_dir):
    backend = make_backend(pipeline_dir)
    x, t, cond = latents(3), torch.tensor([900, 500, 10]), torch.tensor([0, 5, 7])
    assert all(torch.count_nonzero(b) == 0 for b in lora_b(backend))  # peft's gaussian init: B = 0
    pretrained = backend.eps(x, t, cond, finetuned=False)
    torch.testing.assert_close(backend.eps(x, t, cond, finetuned=True), pretrained, rtol=0, atol=0)

    with torch.no_grad():
        for b in lora_b(backend):
            b.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    finetuned = backend.eps(x, t, cond, finetuned=True)
    assert (finetuned - pretrained).abs().max() > 1e-3
    torch.testing.assert_close(backend.eps(x, t, cond, finetuned=False), pretrained, rtol=0, atol=0)

    def fail(module, args, output):
        raise RuntimeError("boom")

    hook = backend.unet.register_forward_hook(fail)  # the pretrained call raises while the adapter is off
    with pytest.raises(RuntimeError, match="boom"):
        backend.eps(x, t, cond, finetuned=False)
    hook.remove()
    torch.testing.assert_close(backend.eps(x, t, cond, finetuned=True), finetuned, rtol=0, atol=0)  # back on


def test_gradient_checkpointing_gives_the_same_gradients(pipeline_dir):
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A initialisation
        backend = make_backend(pipeline_dir, f"model.gradient_checkpointing={checkpointing}")
        assert backend.unet.is_gradient_checkpointing == checkpointing
        assert backend.make_flow_score_net().unet.is_gradient_checkpointing == checkpointing
        with torch.no_grad():
            for b in lora_b(backend):
                b.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
        x = latents(2).requires_grad_(True)
        loss = backend.eps(x, torch.tensor([800, 100]), torch.tensor([1, 2])).square().mean()
        loss = loss + backend.decode(x).mean()
        gradients.append(torch.autograd.grad(loss, [x, *backend.trainable_parameters()]))
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


def unet_batches(backend) -> list[int]:
    sizes: list[int] = []
    backend.unet.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    return sizes


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_classifier_free_guidance(pipeline_dir, guidance):
    backend = make_backend(pipeline_dir, f"model.guidance_scale={guidance}", "model.negative_prompt=blurry")
    with torch.no_grad():
        for b in lora_b(backend):  # a non-trivial adapter, so the finetuned path is exercised
            b.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    x, t, cond = latents(2), torch.tensor([700, 300]), torch.tensor([3, 9])
    sizes = unet_batches(backend)
    eps = backend.eps(x, t, cond)
    assert eps.dtype == torch.float32 and eps.shape == x.shape
    assert sizes == [2 if guidance == 1 else 4]  # one UNet call ([negative; prompt] when guided)

    def call(texts: list[str]) -> torch.Tensor:
        tokens = backend.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        context = backend.text_encoder(tokens.input_ids)[0]
        return backend.unet(x, t, encoder_hidden_states=context).sample

    with torch.no_grad():
        conditional = call([backend.prompts[3], backend.prompts[9]])
        expected = conditional
        if guidance != 1:
            unconditional = call(["blurry", "blurry"])
            expected = unconditional + guidance * (conditional - unconditional)
    torch.testing.assert_close(eps.detach(), expected, rtol=1e-4, atol=1e-5)


def test_text_embeddings_are_computed_once(pipeline_dir):
    backend = make_backend(pipeline_dir)
    encoded: list[int] = []
    backend.text_encoder.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    run_config = load_config(None, overrides(pipeline_dir, "sampler.steps=4"))
    from nablagfn.mdp import make_kernel, rollout

    kernel = make_kernel("ddpm", backend.schedule, run_config.sampler.steps)
    generator = torch.Generator().manual_seed(0)
    rollout(backend, kernel, torch.tensor([0, 1, 1, 2]), generator)
    rollout(backend, kernel, torch.tensor([2, 1, 0, 0]), generator)  # the same prompts: nothing new to encode
    assert sum(encoded) == 3 + 1  # three prompts and the negative prompt, each once
    rollout(backend, kernel, torch.tensor([4, 2]), generator)
    assert sum(encoded) == 5 and len(encoded) == 3  # only the new prompt, in one call


def test_each_sample_uses_its_own_prompt(pipeline_dir):
    backend = make_backend(pipeline_dir)
    x, t = latents(2), torch.tensor([600, 600])
    together = backend.eps(x, t, torch.tensor([4, 11]))
    alone = torch.cat([backend.eps(x[i : i + 1], t[i : i + 1], torch.tensor([c])) for i, c in enumerate([4, 11])])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    other = backend.eps(x, t, torch.tensor([4, 4]))
    torch.testing.assert_close(other[0], together[0], rtol=1e-4, atol=1e-5)
    assert (other[1] - together[1]).abs().max() > 1e-4  # the second sample's prompt matters


def test_decode_gives_differentiable_images_in_unit_range(pipeline_dir):
    backend = make_backend(pipeline_dir)
    x = latents(2).requires_grad_(True)
    image = backend.decode(x)
    assert image.shape == (2, 3, 2 * LATENT_SIZE, 2 * LATENT_SIZE) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    with torch.no_grad():
        raw = backend.vae.decode(x / backend.vae.config.scaling_factor).sample
    torch.testing.assert_close(image, ((raw + 1) / 2).clamp(0, 1))
    (grad,) = torch.autograd.grad(image.mean(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_flow_score_net_starts_at_zero_and_holds_only_its_weights(pipeline_dir):
    backend = make_backend(pipeline_dir)
    net = backend.make_flow_score_net()
    x, t, cond = latents(3), torch.tensor([900, 400, 0]), torch.tensor([0, 1, 2])
    out = net(x, t, cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0
    assert all(p.dtype == torch.float32 for p in net.parameters())
    keys = set(net.state_dict())
    assert keys and all(key.startswith("unet.") for key in keys)
    assert not any("lora" in key or "text_model" in key for key in keys)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in backend.unet.parameters())
    (out * torch.randn_like(out)).sum().backward()
    assert net.unet.conv_out.weight.grad.abs().sum() > 0  # it learns from the start


@pytest.mark.parametrize("kind", ["ddpm", "dpm_solver"])
def test_kernels_roll_out(pipeline_dir, kind):
    run = Run.build(load_config(None, overrides(pipeline_dir, f"sampler.kind={kind}", "sampler.steps=3")))
    generator = torch.Generator().manual_seed(0)
    cond = run.backend.sample_conditions(3, generator)
    trajectories = run.rollout(cond, generator)
    assert trajectories.states.shape == (3, 4, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    assert torch.isfinite(trajectories.states).all() and torch.isfinite(trajectories.log_probs).all()
    assert torch.equal(trajectories.cond, cond)
    log_reward = run.log_reward(trajectories.final, cond)
    assert log_reward.shape == (3,) and torch.isfinite(log_reward).all()


TRAIN = (
    "method.beta=100",
    "train.trajectories_per_epoch=2",
    "train.batch_size=2",
    "train.updates=1",
    "train.eval_samples=2",
    "train.checkpoint_every=1",
)


def test_reward_gradient_in_chunks_equals_the_whole_batch(pipeline_dir):
    """The look-ahead ∇ log R(x̂(x)) decodes model.reward_grad_batch_size images at a time: the same gradient."""
    gradients = []
    for size in (1, 2, 8):
        run = Run.build(load_config(None, overrides(pipeline_dir, "method.name=residual_nabla_db",
                                                    f"model.reward_grad_batch_size={size}")))
        decoded, decode = [], run.backend.decode
        run.backend.decode = lambda clean: decoded.append(len(clean)) or decode(clean)
        x = latents(5)
        state_index = torch.tensor([0, 1, 2, 3, 3])  # the last two are final states: their own clean state
        cond = torch.zeros(5, dtype=torch.long)
        gradients.append(run.method.predicted_log_reward_grad(x, state_index, cond, torch.Generator().manual_seed(0)))
        assert decoded == [min(size, 5 - start) for start in range(0, 5, size)]
    assert gradients[0].abs().max() > 0
    for gradient in gradients[1:]:
        torch.testing.assert_close(gradient, gradients[0], rtol=1e-5, atol=1e-7)


def test_training_step_changes_adapter_and_flow_only_and_reloads(pipeline_dir, tmp_path):
    config = load_config(None, overrides(pipeline_dir, *TRAIN))
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)
    backend = trainer.run.backend
    base_before = base_weights(backend)
    lora_before = {k: v.clone() for k, v in backend.adapter_state_dict().items()}
    flow_before = {k: v.clone() for k, v in trainer.run.method.networks.state_dict().items()}
    trainer.train()

    assert all(torch.equal(base_before[k], v) for k, v in base_weights(backend).items())
    lora_after = backend.adapter_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    flow_after = trainer.run.method.networks.state_dict()
    assert any(not torch.equal(flow_before[k], flow_after[k]) for k in flow_before)

    # the checkpoint restores the adapter and g_φ into a freshly built run
    fresh = Run.build(config)
    load_weights(fresh, list_checkpoints(tmp_path / "run")[-1])
    for name, value in fresh.backend.adapter_state_dict().items():
        assert torch.equal(value, lora_after[name]), name
    for name, value in fresh.method.networks.state_dict().items():
        assert torch.equal(value, flow_after[name]), name


def test_cli_train(pipeline_dir, tmp_path):
    from nablagfn.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", *overrides(pipeline_dir, *TRAIN)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "loss" in r] == [1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert [p.name for p in list_checkpoints(run_dir)] == ["update_0000001"]
    assert main(["sample", str(run_dir), "--num", "2", "--out", str(tmp_path / "images")]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000.png", "00001.png"]
    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--num", "2", "--split", "eval", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["split"] == "eval" and set(results) >= {"finetuned", "pretrained"}


def test_missing_or_incomplete_pipeline_names_model_path(pipeline_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path.*not found"):
        make_backend(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model\.path.*lacks unet"):
        make_backend(tmp_path / "half")
    with pytest.raises(ConfigError, match=r"model\.path.*HF_HUB_OFFLINE"):  # a hub id, with the hub off
        make_backend("nobody/no-such-pipeline")
    with pytest.raises(ConfigError, match=r"model\.lora_targets"):
        make_backend(pipeline_dir, "model.lora_targets=[no_such_layer]")


def test_pipeline_weights_are_read_from_safetensors_only(pipeline_dir, tmp_path):
    """A pipeline whose UNet is a pickled .bin is refused, not unpickled."""
    from safetensors.torch import load_file

    pipeline = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, pipeline)
    unet = pipeline / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model\.path: Stable Diffusion pipeline .*pipeline.* could not be read"):
        make_backend(pipeline)


# -- prompt tables ----------------------------------------------------------------------


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\n\n  a blue whale  \n\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a red fox", "a blue whale"]
    (tmp_path / "p.json").write_text(json.dumps(["one", "two", "three"]))
    assert read_prompts(str(tmp_path / "p.json")) == ["one", "two", "three"]
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sleeping"\n2,\n3,a dog\n')
    assert read_prompts(str(tmp_path / "p.csv"), column="caption") == ["a cat, sleeping", "a dog"]
    animals = read_prompts("animals")
    assert len(animals) == 45 and len(set(animals)) == 45 and animals[-1] == "kangaroo"


@pytest.mark.parametrize(
    "name,content,column,message",
    [
        ("missing.txt", None, "prompt", r"model\.prompts\.source: prompt file .* not found"),
        ("empty.txt", "\n \n", "prompt", r"model\.prompts\.source: .* holds no prompts"),
        ("bad.json", '{"a": 1}', "prompt", r"model\.prompts\.source: .* JSON list of strings"),
        ("p.csv", "text\nhello\n", "prompt", r"model\.prompts\.column: .* no column 'prompt' \(its columns: text\)"),
        ("p.yaml", "- a\n", "prompt", r"model\.prompts\.source: .* unknown extension"),
    ],
)
def test_prompt_file_errors(tmp_path, name, content, column, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_prompts(str(tmp_path / name), column)


def test_held_out_split():
    train, held = split_held_out(45, 0.2, seed=3)
    assert len(held) == 9 and len(train) == 36
    assert sorted(torch.cat([train, held]).tolist()) == list(range(45))
    again_train, again_held = split_held_out(45, 0.2, seed=3)
    assert torch.equal(train, again_train) and torch.equal(held, again_held)
    assert not torch.equal(split_held_out(45, 0.2, seed=4)[1], held)
    everything, same = split_held_out(5, 0.0, seed=0)
    assert torch.equal(everything, same) and everything.tolist() == list(range(5))
    assert len(split_held_out(5, 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one prompt
    with pytest.raises(ConfigError, match=r"model\.prompts\.held_out"):
        split_held_out(1, 0.5, seed=0)


def test_backend_draws_conditions_from_its_split(pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(10)))
    backend = make_backend(pipeline_dir, f"model.prompts.source={prompts}", "model.prompts.held_out=0.3")
    assert backend.prompts == [f"prompt {i}" for i in range(10)]
    generator = torch.Generator().manual_seed(0)
    held = set(backend.prompt_table.eval_ids.tolist())
    train_draws = set(backend.sample_conditions(200, generator).tolist())
    eval_draws = set(backend.sample_conditions(200, generator, "eval").tolist())
    assert len(held) == 3 and eval_draws == held and train_draws == set(range(10)) - held


def test_paper_config_validates(pipeline_dir):
    config = load_config(Path(__file__).parents[1] / "configs" / "sd_aesthetic.yaml", [f"model.path={pipeline_dir}"])
    assert config.model.kind == "stable_diffusion" and config.reward.kind == "aesthetic"
    assert config.sampler.kind == "ddpm" and config.sampler.steps == 50
    assert config.model.guidance_scale == 5.0 and config.model.lora_rank == 8


def test_text_image_reward_scores_each_sample_with_its_own_prompt(pipeline_dir, tmp_path):
    """SD + a CLIP-score reward (tiny, real format): the run hands the prompt table over, training runs."""
    from test_rewards_clip import _save_clip, _save_preprocessor, _save_tokenizer

    clip_dir = tmp_path / "clip"
    _save_clip(clip_dir, 16, seed=0)
    _save_tokenizer(clip_dir)
    _save_preprocessor(clip_dir)
    config = load_config(None, [*overrides(pipeline_dir, *TRAIN), "reward.kind=clip", f"reward.model={clip_dir}"])
    trainer = Trainer.from_config(config, tmp_path / "run", progress=False)
    run = trainer.run
    assert run.reward.prompts == run.backend.prompts and len(run.backend.prompts) == 45
    metrics = trainer.train()
    assert torch.isfinite(torch.tensor(metrics["log_reward_mean"]))
    states, cond = run.sample_with_conditions(3, seed=0)
    assert len(set(cond.tolist())) > 1
    images = run.decode(states)
    together = run.reward.log_reward(images, cond)
    alone = torch.cat([run.reward.log_reward(images[i : i + 1], cond[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_the_stable_diffusion_defaults_run_on_a_cpu(pipeline_dir, tmp_path, capsys):
    """A new user's first command, with no other keys: the presets (64 trajectories per epoch, 64 evaluation samples,
    fp32 on a CPU) make it finish in seconds on the tiny pipeline (it did not finish in 20 minutes before), and the
    run says what it is about to do."""
    from nablagfn.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", "model.kind=stable_diffusion",
                 f"model.path={pipeline_dir}", "reward.kind=brightness", "sampler.steps=4", "train.updates=2"]) == 0
    out = capsys.readouterr().out
    assert "fp32 base weights" in out and "2 updates of 32 trajectories (2 × 16), 64 per epoch" in out
    assert "evaluations: 2 × 64 samples" in out
    assert json.loads((run_dir / "eval.json").read_text())["log_reward_mean"] > 0
