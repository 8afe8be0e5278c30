"""The Python API: a trainer from parts, your own reward, runs that record what they trained with, the README's
Python API and the examples as written, and the LoRA round trip into diffusers."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from api_rewards import ink
from conftest import SMALL_RUN
from tiny_sd import save_tiny_sd

import nablagfn as ng
from nablagfn.cli import main
from nablagfn.config_loading import load_config

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SMALL = {"updates": 2, "trajectories_per_epoch": 4, "batch_size": 4, "eval_samples": 8, "eval_every": 2,
                "checkpoint_every": 2}


def environment() -> dict[str, str]:
    """A subprocess's environment: offline, one thread, the tests directory importable."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


def test_help_lists_the_api_and_rewards_import_nothing_from_backends():
    for name in ("Trainer", "CallableReward", "StableDiffusionBackend", "load_run", "export_lora"):
        assert name in ng.__all__ and name in ng.__doc__
    rewards = ROOT / "src" / "nablagfn" / "rewards"
    offending = [path.name for path in rewards.glob("*.py") if re.search(r"from \.\.backends", path.read_text())]
    assert offending == []


def test_parts_and_config_give_the_same_run(tmp_path):
    """Trainer(parts) and Trainer.from_config (what the CLI runs) cannot drift: the same weights, bit for bit."""
    config = load_config(None, [*SMALL_RUN, "train.updates=3"])
    by_config = ng.Trainer.from_config(config, tmp_path / "a", progress=False)
    by_config.train(write_outputs=False)
    torch.manual_seed(config.train.seed)
    backend, reward = ng.build_backend(config.model), ng.build_reward(config.reward)
    by_parts = ng.Trainer(backend, reward, config.method, sampler=config.sampler, train=config.train,
                          eval=config.eval, run_dir=tmp_path / "b", progress=False)
    by_parts.train(write_outputs=False)
    assert by_parts.config == by_config.config
    for a, b in zip(by_config.run.backend.trainable_parameters(), by_parts.run.backend.trainable_parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "a" / "config.yaml").read_text() == (tmp_path / "b" / "config.yaml").read_text()


def test_mappings_get_the_model_presets_beneath_them(tmp_path):
    trainer = ng.Trainer(ng.DigitsBackend.pretrained(), ng.CallableReward(ink), "residual_nabla_db",
                         train={"updates": 7}, run_dir=tmp_path, progress=False)
    assert trainer.config.train.updates == 7
    assert trainer.config.train.batch_size == 16  # the digits preset
    assert trainer.config.method.beta == 1.0  # the digits preset


@pytest.mark.parametrize("train", [ng.TrainConfig(updates=1), {"updates": 1}])
def test_config_objects_leave_the_model_dependent_defaults_to_a_flow_model(tmp_path, train):
    """A SamplerConfig or method config that does not set ``sampler.kind`` or ``method.gamma`` gets the flow model's
    (flow_ddpm, one), beside a mapping as beside config objects; what they set is kept."""
    backend = ng.DigitsBackend.pretrained(parameterization="flow")
    trainer = ng.Trainer(backend, ng.CallableReward(ink), ng.ResidualNablaDBConfig(beta=2.0),
                         sampler=ng.SamplerConfig(steps=5), train=train, run_dir=tmp_path / "a", progress=False)
    config = trainer.config
    assert (config.sampler.kind, config.sampler.steps, config.method.gamma, config.method.beta) == (
        "flow_ddpm", 5, "one", 2.0)
    given = ng.Trainer(backend, ng.CallableReward(ink), ng.ResidualNablaDBConfig(gamma="alpha_bar", policy_target="detailed_balance"),
                       sampler=ng.SamplerConfig(kind="flow_sde"), train=train, run_dir=tmp_path / "b", progress=False)
    assert (given.config.sampler.kind, given.config.method.gamma) == ("flow_sde", "alpha_bar")


def test_a_reward_without_gradients_is_refused_by_gradient_methods(tmp_path):
    reward = ng.CallableReward(ink, differentiable=False)
    with pytest.raises(ng.ConfigError, match="not differentiable"):
        ng.Trainer(ng.DigitsBackend.pretrained(), reward, ng.DRaFTConfig(), run_dir=tmp_path, progress=False)
    ng.Trainer(ng.DigitsBackend.pretrained(), reward, ng.DDPOConfig(), run_dir=tmp_path, progress=False)
    with pytest.raises(ng.ConfigError, match="draft needs reward gradients"):
        load_config(None, ["reward.kind=python", "reward.function=api_rewards:ink", "reward.differentiable=false",
                           "method.name=draft"])


def test_a_reward_function_must_return_one_value_per_sample(tmp_path):
    trainer = ng.Trainer(ng.DigitsBackend.pretrained(), ng.CallableReward(lambda images, prompts: images.mean()),
                         train=DIGITS_SMALL, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"one log R per sample, shape \(4,\)"):
        trainer.sample_epoch()


def test_an_importable_reward_is_recorded_and_rebuilt(tmp_path):
    """A reward function from a module is recorded by its import path: eval and sample rebuild it by themselves."""
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    trainer = ng.Trainer(ng.DigitsBackend.pretrained(), ng.CallableReward(ink), train=DIGITS_SMALL, run_dir=run_dir,
                         progress=False)
    final = trainer.train(write_outputs=False)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["reward"] == {"kind": "python", "function": "api_rewards:ink", "differentiable": True}
    assert saved["handed_over"] == []
    run = ng.load_run(run_dir)
    assert run.evaluate(8)["log_reward_mean"] == pytest.approx(final["log_reward_mean"], abs=1e-6)
    # and from the command line, by name
    assert main(["train", "--out", str(tmp_path / "cli"), "--no-progress", "reward.kind=python",
                 "reward.function=api_rewards:ink", "train.updates=1", "train.trajectories_per_epoch=4",
                 "train.batch_size=4", "train.eval_samples=8"]) == 0


def test_a_handed_over_reward_is_required_again(tmp_path, capsys):
    """A reward defined in a script cannot be imported by name: the run says so, and refuses to guess."""
    run_dir = tmp_path / "run"
    trainer = ng.Trainer(ng.DigitsBackend.pretrained(), ng.CallableReward(lambda images, prompts: images.mean((1, 2, 3))),
                         train=DIGITS_SMALL, run_dir=run_dir, progress=False)
    trainer.train(write_outputs=False)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["handed_over"] == ["reward"]
    with pytest.raises(ng.ConfigError, match="handed over in Python"):
        ng.load_run(run_dir)
    for command in (["eval", str(run_dir), "--num", "4"], ["train", "--resume", str(run_dir)]):
        assert main(command) == 2
        error = capsys.readouterr().err.strip()
        assert "handed over in Python" in error and len(error.splitlines()) == 1
    run = ng.load_run(run_dir, reward=ng.CallableReward(lambda images, prompts: images.mean((1, 2, 3))))
    assert run.checkpoint.name == "update_0000002"


def test_resume_extends_a_finished_run_and_refuses_history_changes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = [*SMALL_RUN, "train.updates=2", "train.log_every=1"]
    assert main(["train", "--out", str(run_dir), "--no-progress", *base]) == 0
    assert main(["train", "--resume", str(run_dir), "method.beta=2"]) == 2
    assert "method.beta cannot change" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "--no-progress", "train.updates=4"]) == 0
    updates = [yaml.safe_load(line)["update"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [u for u in updates if u > 0] == [1, 2, 2, 3, 4, 4]  # training and evaluation records, each once
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["updates"] == 4
    # the cosine schedule (torch's LambdaLR, checkpointed) continues over the new length: lr at update u uses u − 1
    records = [yaml.safe_load(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    learning_rates = {r["update"]: r["lr/policy"] for r in records if "lr/policy" in r}
    for update in (3, 4):
        factor = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (update - 1) / 4))
        assert learning_rates[update] == pytest.approx(3e-3 * factor, rel=1e-12)


def test_readme_python_api_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    section = section[: section.index("\n## ", 1)]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))
    assert "CallableReward" in code
    (tmp_path / "readme_api.py").write_text(code)
    result = subprocess.run([sys.executable, "readme_api.py"], cwd=tmp_path, env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = map(float, re.search(r"pretrained ([\d.]+), finetuned ([\d.]+)", result.stdout).groups())
    assert after > before
    run_dir = tmp_path / "runs" / "api_ink"
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "samples.png", "curves.png"):
        assert (run_dir / name).is_file(), name


def test_example_digits_custom_reward(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "digits_custom_reward.py"), "--updates", "4",
                             "--eval-samples", "16", "--out", str(tmp_path / "run")],
                            env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"mean ink: pretrained [\d.]+ → finetuned [\d.]+", result.stdout)
    assert (tmp_path / "run" / "samples.png").is_file()


def test_example_stable_diffusion_from_pipeline(tmp_path, pipeline_dir):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "stable_diffusion_from_pipeline.py"),
                             "--pipeline", str(pipeline_dir), "--updates", "2", "--steps", "3", "--trajectories", "4",
                             "--out", str(tmp_path / "run")],
                            env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diffusers with the exported LoRA: 2 images" in result.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["handed_over"] == ["model", "reward"] and saved["model"]["path"] == str(pipeline_dir)


@pytest.fixture(scope="module")
def finetuned_sd_run(tmp_path_factory, pipeline_dir):
    """A tiny-SD run whose LoRA moved the samples (large learning rate), with alpha ≠ rank."""
    run_dir = tmp_path_factory.mktemp("sd") / "run"
    config = load_config(None, [
        "model.kind=stable_diffusion", f"model.path={pipeline_dir}", "model.dtype=fp32", "model.flow_channels=[8,16]",
        "model.lora_rank=4", "model.lora_alpha=8", "model.prompts.source=[a cat, a dog]", "reward.kind=brightness",
        "sampler.steps=4", "train.updates=3", "train.trajectories_per_epoch=4", "train.batch_size=4",
        "train.eval_samples=4", "eval.prior_fid=false", "train.policy_optimizer.lr=0.05",
    ])
    ng.Trainer.from_config(config, run_dir, progress=False).train(write_outputs=False)
    return run_dir


def diffusers_images(pipe, prompts: list[str], steps: int, seed: int) -> torch.Tensor:
    """Diffusers' own DDIM sampler with η = 1 and the settings nablagfn samples with."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, eta=1.0, height=16, width=16,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def test_export_round_trip_into_diffusers(tmp_path, pipeline_dir, finetuned_sd_run):
    """The exported LoRA, and the merged pipeline, generate with diffusers' sampler what nablagfn samples from the same
    noise; the LoRA moved the images, so this is not the base model agreeing with itself."""
    from diffusers import StableDiffusionPipeline

    assert main(["export", str(finetuned_sd_run), "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(finetuned_sd_run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    run = ng.load_run(finetuned_sd_run)
    cond = torch.zeros(2, dtype=torch.long)  # prompt 0, "a cat", as diffusers gets it
    ours = run.decode(run.rollout(cond, torch.Generator().manual_seed(7), record=False))
    base = run.decode(run.rollout(cond, torch.Generator().manual_seed(7), finetuned=False, record=False))

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    plain = diffusers_images(pipe, ["a cat"] * 2, 4, 7)
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora = diffusers_images(pipe, ["a cat"] * 2, 4, 7)
    merged = diffusers_images(StableDiffusionPipeline.from_pretrained(tmp_path / "merged", safety_checker=None),
                              ["a cat"] * 2, 4, 7)
    assert (base - plain).abs().max() < 1e-5  # the samplers agree
    assert (ours - plain).abs().max() > 1e-2  # the LoRA matters
    assert (ours - with_lora).abs().max() < 1e-5
    assert (ours - merged).abs().max() < 1e-5
    card = (tmp_path / "lora" / "README.md").read_text()
    for fact in ("residual_nabla_db", "β = 0.5", "brightness", str(pipeline_dir), "rank 4, alpha 8", "updates: 3"):
        assert fact in card


def test_export_refuses_models_diffusers_cannot_load(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", *SMALL_RUN, "train.updates=1"]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    assert "needs model.kind=stable_diffusion" in capsys.readouterr().err


def test_eval_keeps_the_training_eval_json_and_sample_writes_one_grid(tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    small = ["train.updates=2", "train.trajectories_per_epoch=4", "train.batch_size=4", "train.eval_samples=8",
             "sampler.steps=5", "eval.prior_fid=false"]
    assert main(["train", "--out", str(run_dir), "--no-progress", *small]) == 0
    training = (run_dir / "eval.json").read_text()
    assert main(["eval", str(run_dir), "--num", "8"]) == 0
    assert (run_dir / "eval.json").read_text() == training
    written = yaml.safe_load((run_dir / "evaluations" / "update_0000002_train_n8_seed1234.json").read_text())
    assert set(written) >= {"finetuned", "pretrained", "checkpoint"}
    assert main(["sample", str(run_dir), "--num", "9", "--out", str(tmp_path / "grid.png"), "--grid"]) == 0
    width, height = Image.open(tmp_path / "grid.png").size
    assert width == height == 3 * 64 + 4 * 2  # 3 × 3 digits upscaled to 64 pixels, 2-pixel gaps
    assert main(["sample", str(run_dir), "--num", "4", "--out", str(tmp_path / "grid"), "--grid"]) == 2


def test_a_mixture_made_in_python_is_recorded_and_measured_against_its_target(tmp_path):
    backend = ng.GaussianMixtureBackend.from_mixture([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], weights=[0.7, 0.3],
                                                     hidden=32, layers=2)
    reward = ng.build_reward(ng.LinearRewardConfig(direction=[1.0, 0.0]))
    trainer = ng.Trainer(backend, reward, ng.ResidualNablaDBConfig(beta=0.5), sampler={"steps": 10},
                         train={"updates": 2, "trajectories_per_epoch": 32, "batch_size": 16, "eval_samples": 200},
                         run_dir=tmp_path, progress=False)
    assert trainer.config.handed_over == [] and trainer.config.model.weights == [0.7, 0.3]
    metrics = trainer.train(write_outputs=False)
    assert {"mode_tv", "energy_distance"} <= set(metrics)
    assert ng.load_run(tmp_path).exact_target() is not None


def test_save_to_a_directory_and_load_from_it_resumes_exactly(tmp_path):
    config = load_config(None, [*SMALL_RUN, "train.updates=4"])
    straight = ng.Trainer.from_config(config, tmp_path / "a", progress=False)
    for _ in range(4):
        straight.update()
    first = ng.Trainer.from_config(config, tmp_path / "b", progress=False)
    for _ in range(2):
        first.update()
    saved = first.save(tmp_path / "elsewhere")
    assert saved == tmp_path / "elsewhere" and (saved / "model.safetensors").is_file()
    second = ng.Trainer.from_config(config, tmp_path / "c", progress=False)
    second.load(saved)
    for _ in range(2):
        second.update()
    assert second.step == 4
    for a, b in zip(straight.run.backend.trainable_parameters(), second.run.backend.trainable_parameters()):
        assert torch.equal(a, b)
