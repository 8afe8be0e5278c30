"""The command line: train / sample / eval through nablagfn.cli.main, and `python -m nablagfn`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nablagfn.cli import main
from nablagfn.config_loading import load_config
from nablagfn.train.run import Run

TRAIN_ARGS = [
    "--no-progress",
    "model.kind=gmm",
    "train.updates=4",
    "train.eval_samples=200",
    "train.checkpoint_every=2",
    "train.trajectories_per_epoch=32",
    "train.batch_size=16",
    "sampler.steps=10",
    "model.hidden=32",
    "model.layers=2",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One small training run shared by the read-only tests below."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(run_dir), *TRAIN_ARGS]) == 0
    return run_dir


def test_train_writes_run_directory(trained_run):
    config = load_config(trained_run / "config.yaml")
    assert config.train.updates == 4 and config.sampler.steps == 10 and config.model.hidden == 32

    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    training = [r["update"] for r in records if "loss" in r]
    evaluations = [r["update"] for r in records if "eval/log_reward_mean" in r]
    assert training == [4]  # default log_every=10: only the last update is logged
    assert evaluations == [0, 4]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)

    checkpoints = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert checkpoints == ["update_0000002", "update_0000004"]
    for name in checkpoints:
        files = {p.name for p in (trained_run / "checkpoints" / name).iterdir()}
        assert files == {"model.safetensors", "optimizers.safetensors", "shard_000.safetensors", "state.json"}

    metrics = json.loads((trained_run / "eval.json").read_text())
    for key in ("log_reward_mean", "mode_tv", "energy_distance"):
        assert np.isfinite(metrics[key])
    png = (trained_run / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_sample_finetuned_and_pretrained(trained_run, tmp_path):
    finetuned, again, pretrained = tmp_path / "ft.npy", tmp_path / "ft2.npy", tmp_path / "sub" / "pre.npy"
    assert main(["sample", str(trained_run), "--num", "50", "--out", str(finetuned)]) == 0
    assert main(["sample", str(trained_run), "--num", "50", "--out", str(again)]) == 0
    assert main(["sample", str(trained_run), "--num", "50", "--out", str(pretrained), "--pretrained"]) == 0
    a, b, p = np.load(finetuned), np.load(again), np.load(pretrained)
    assert a.shape == b.shape == p.shape == (50, 2)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # seeded
    assert np.abs(a - p).max() > 0  # four updates changed the policy
    # --pretrained is the untouched pretrained sampler
    fresh = Run.build(load_config(trained_run / "config.yaml"))
    np.testing.assert_array_equal(p, fresh.sample(50, seed=0, finetuned=False).numpy())
    # an explicit (earlier) checkpoint gives other samples than the latest one
    early = tmp_path / "early.npy"
    checkpoint = trained_run / "checkpoints" / "update_0000002"
    assert main(["sample", str(trained_run), "--num", "50", "--out", str(early), "--checkpoint", str(checkpoint)]) == 0
    assert np.abs(np.load(early) - a).max() > 0


def test_eval_writes_json(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained_run), "--num", "300", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["num_samples"] == 300
    assert results["checkpoint"].endswith("update_0000004")
    for name in ("finetuned", "pretrained"):
        for key in ("mode_tv", "energy_distance", "log_reward_mean"):
            assert np.isfinite(results[name][key]), (name, key)
    assert results["finetuned"] != results["pretrained"]
    # evaluation is reproducible from its seed
    again = tmp_path / "again.json"
    assert main(["eval", str(trained_run), "--num", "300", "--out", str(again)]) == 0
    assert json.loads(again.read_text())["finetuned"] == results["finetuned"]


def test_bad_override_exits_2_and_names_key(tmp_path, capsys):
    run_dir = tmp_path / "bad"
    assert main(["train", "--out", str(run_dir), "--no-progress", "method.betaa=1"]) == 2
    err = capsys.readouterr().err
    assert "method.betaa" in err
    assert not (run_dir / "checkpoints").exists()
    assert main(["train", "--out", str(run_dir), "--no-progress", "method.beta"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_commands_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--num", "5", "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "not a run directory" in err
    assert not (tmp_path / "x.npy").exists()
    assert main(["eval", str(tmp_path / "missing"), "--num", "5"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    # a run directory without a checkpoint
    (tmp_path / "config.yaml").write_text("train:\n  updates: 3\n")
    assert main(["eval", str(tmp_path), "--num", "5"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_refuses_to_overwrite_a_run_and_bad_resume(trained_run, capsys):
    before = (trained_run / "metrics.jsonl").read_text()
    assert main(["train", "--out", str(trained_run), *TRAIN_ARGS]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained_run), "method.beta=2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (trained_run / "metrics.jsonl").read_text() == before


def test_sample_num_must_be_positive(trained_run, tmp_path, capsys):
    assert main(["sample", str(trained_run), "--num", "0", "--out", str(tmp_path / "x.npy")]) == 2
    assert "--num" in capsys.readouterr().err


def test_yaml_config_three_modes_linear_reward(tmp_path):
    config_path = tmp_path / "three.yaml"
    config_path.write_text(
        "model:\n"
        "  means: [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]\n"
        "  stds: [0.4, 0.4, 0.3]\n"
        "  weights: [0.5, 0.25, 0.25]\n"
        "reward:\n"
        "  kind: linear\n"
        "  direction: [0.5, 0.0]\n"
        "method:\n"
        "  beta: 1.0\n"
    )
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(config_path), "--out", str(run_dir), *TRAIN_ARGS, "train.updates=2"]
    assert main(args) == 0
    config = load_config(run_dir / "config.yaml")
    assert len(config.model.means) == 3 and config.reward.kind == "linear" and config.train.updates == 2
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert np.isfinite(metrics["mode_tv"]) and np.isfinite(metrics["energy_distance"])

    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--num", "300", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    # the pretrained sampler is far from the exact tilt (mode weights 0.5/0.25/0.25 → mostly the right mode)
    assert results["pretrained"]["mode_tv"] > 0.2
    samples = tmp_path / "s.npy"
    assert main(["sample", str(run_dir), "--num", "20", "--out", str(samples)]) == 0
    assert np.load(samples).shape == (20, 2)


def test_python_dash_m_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "nablagfn", "--help"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "sample", "eval"):
        assert command in result.stdout
    bad = subprocess.run([sys.executable, "-m", "nablagfn", "frobnicate"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2


def test_trained_weights_load_back(trained_run):
    """The checkpoint the CLI loads holds the trained adapter (not the zero initialisation)."""
    from nablagfn.train.trainer import load_weights

    run = Run.build(load_config(trained_run / "config.yaml"))
    assert all(torch.count_nonzero(p) == 0 for p in run.backend.residual.out.parameters())
    load_weights(run, trained_run / "checkpoints" / "update_0000004")
    assert any(torch.count_nonzero(p) > 0 for p in run.backend.residual.out.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a run recorded on cuda must be one this machine cannot load")
def test_a_run_trained_on_a_gpu_samples_and_evaluates_on_the_cpu(trained_run, tmp_path, capsys):
    """A run whose config says train.device=cuda (copied from the CPU run: same weights) is refused as it is, with the
    flag to use, and loads with --device cpu to the same samples as the CPU run."""
    import shutil

    gpu_run = tmp_path / "gpu_run"
    shutil.copytree(trained_run, gpu_run)
    config = (gpu_run / "config.yaml").read_text()
    assert "device: cpu" in config
    (gpu_run / "config.yaml").write_text(config.replace("device: cpu", "device: cuda"))

    out = tmp_path / "s.npy"
    assert main(["sample", str(gpu_run), "--num", "20", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "trained on cuda" in error and "--device cpu" in error and len(error.strip().splitlines()) == 1
    assert main(["sample", str(gpu_run), "--num", "20", "--out", str(out), "--device", "cpu"]) == 0
    reference = tmp_path / "ref.npy"
    assert main(["sample", str(trained_run), "--num", "20", "--out", str(reference)]) == 0
    np.testing.assert_array_equal(np.load(out), np.load(reference))
    assert main(["eval", str(gpu_run), "--num", "50", "--out", str(tmp_path / "e.json"), "--device", "cpu"]) == 0
