"""Faults and bad input: each gives a clear error naming the file or key, before any work, and loses nothing.

The catalogue (issue 6): empty or malformed prompt files; unreadable checkpoints on ``--resume``, ``sample`` and
``eval``; reward weights missing offline; a disk that fills up while a checkpoint is written; NaN rewards; a
method that needs reward gradients with a reward that has none; pickled code in reward or feature weights.
Where the check needs a heavy import, it lives with that model's tests: HPSv2 checkpoints holding pickled code
(test_rewards_hpsv2.py), CLIP and Stable Diffusion directories with only pickled ``.bin`` weights
(test_rewards_clip.py, test_stable_diffusion.py); invalid configs in test_config.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TWO_UPDATES_PER_EPOCH
from safetensors.torch import load_file

import nablagfn.train.checkpoint as checkpoint_module
from nablagfn.backends.prompts import read_prompts
from nablagfn.cli import main
from nablagfn.config_loading import load_config
from nablagfn.errors import CheckpointError, ConfigError, NonFiniteLossError
from nablagfn.rewards import build_reward
from nablagfn.rewards.vector import GaussianReward
from nablagfn.train.checkpoint import list_checkpoints, load_model_tensors
from nablagfn.train.trainer import Trainer

SMALL = [*TWO_UPDATES_PER_EPOCH, "train.eval_every=1000"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def training_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path → bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def model_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_one_line_error(err: str, *names: str, one_line: bool = True) -> None:
    """A ``nablagfn: error: …`` message naming each of ``names``, without a traceback (config errors list their
    problems one per line: ``one_line=False``)."""
    assert "Traceback" not in err, err
    assert err.startswith("nablagfn: error: "), err
    if one_line:
        assert err.strip().count("\n") == 0, err
    for name in names:
        assert name in err, (name, err)


# -- prompt files ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", b"", r"model\.prompts\.source: .*empty\.txt.* holds no prompts"),
        ("blank.txt", b"\n  \n\t\n", r"model\.prompts\.source: .*blank\.txt.* holds no prompts"),
        ("empty.json", b"", r"model\.prompts\.source: .*empty\.json.* is not valid JSON"),
        ("none.json", b"[]", r"model\.prompts\.source: .*none\.json.* holds no prompts"),
        ("cut.json", b'["a red fox", "a blue wh', r"model\.prompts\.source: .*cut\.json.* is not valid JSON"),
        ("numbers.json", b'["a cat", 3]', r"model\.prompts\.source: .*numbers\.json.* JSON list of strings"),
        ("header.csv", b"prompt\n", r"model\.prompts\.source: .*header\.csv.* holds no prompts"),
        ("quote.csv", b'prompt\n"a cat, sleeping\n', r"model\.prompts\.source: .*quote\.csv.* is not valid CSV"),
        ("latin1.txt", "a café\n".encode("latin-1"), r"model\.prompts\.source: .*latin1\.txt.* is not UTF-8"),
    ],
)
def test_empty_or_malformed_prompt_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_prompts(str(tmp_path / name))


def test_bad_prompt_file_fails_before_the_pipeline_is_loaded(tmp_path, capsys):
    """The prompt file is read first: the error is about it although model.path does not exist either."""
    (tmp_path / "prompts.json").write_text('{"prompts": ["a cat"]}')
    run_dir = tmp_path / "run"
    code = main(["train", "--out", str(run_dir), "--no-progress", "model.kind=stable_diffusion",
                 f"model.path={tmp_path / 'no_pipeline'}", "reward.kind=brightness",
                 f"model.prompts.source={tmp_path / 'prompts.json'}"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "model.prompts.source", "prompts.json", "JSON list of strings")
    assert not run_dir.exists()


# -- unreadable checkpoints --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-update run with checkpoints at updates 2 and 4."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    config = load_config(None, [*SMALL, "train.updates=4", "train.checkpoint_every=2"])
    Trainer.from_config(config, run_dir, progress=False).train()
    assert [p.name for p in list_checkpoints(run_dir)] == ["update_0000002", "update_0000004"]
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # garbage
        path.write_bytes(b"\x89not a checkpoint file\x00" * 40)


DAMAGE = ["missing", "truncated", "empty", "garbage"]


@pytest.mark.parametrize("how", DAMAGE)
def test_resume_from_an_unreadable_checkpoint_names_the_file_and_changes_nothing(trained, tmp_path, capsys, how):
    """Every file of the latest checkpoint, damaged in turn: a one-line error naming it; the run is left as it was
    (the log is not truncated, no file is removed or rewritten)."""
    run_dir = _copy(trained, tmp_path)
    latest = list_checkpoints(run_dir)[-1]
    names = sorted(p.name for p in latest.iterdir())
    assert "model.safetensors" in names and "state.json" in names and len(names) >= 3
    for name in names:
        _damage(latest / name, how)
        before = snapshot(run_dir)
        assert main(["train", "--resume", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert_one_line_error(err, name, latest.name)
        assert snapshot(run_dir) == before, name
        shutil.rmtree(run_dir)
        run_dir = _copy(trained, tmp_path)


def test_unreadable_checkpoint_is_a_checkpoint_error_in_the_api(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    latest = list_checkpoints(run_dir)[-1]
    _damage(latest / "optimizers.safetensors", "truncated")
    config = load_config(run_dir / "config.yaml")
    with pytest.raises(CheckpointError, match=r"optimizers\.safetensors.*(unreadable|changed since it was written)"):
        Trainer.from_config(config, run_dir, progress=False).train(resume=True)
    shutil.copy(list_checkpoints(trained)[-1] / "optimizers.safetensors", latest)
    (latest / "state.json").write_text('{"update": 4}')  # valid JSON, but not a checkpoint's state
    with pytest.raises(CheckpointError, match=r"state\.json"):
        Trainer.from_config(config, run_dir, progress=False).train(resume=True)


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_from_an_unreadable_checkpoint(trained, tmp_path, capsys, how, command):
    run_dir = _copy(trained, tmp_path)
    _damage(list_checkpoints(run_dir)[-1] / "model.safetensors", how)
    before = snapshot(run_dir)
    out = tmp_path / "samples.npy"
    extra = ["--out", str(out)] if command == "sample" else []
    assert main([command, str(run_dir), "--num", "8", *extra]) == 2
    assert_one_line_error(capsys.readouterr().err, "model.safetensors", "update_0000004")
    assert snapshot(run_dir) == before and not out.exists()
    # an earlier checkpoint still serves
    earlier = list_checkpoints(run_dir)[0]
    assert main(["sample", str(run_dir), "--num", "8", "--out", str(out), "--checkpoint", str(earlier)]) == 0


def test_resume_with_an_unreadable_config(trained, tmp_path, capsys):
    run_dir = _copy(trained, tmp_path)
    (run_dir / "config.yaml").write_text("model: {kind: gmm\n")
    before = snapshot(run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert_one_line_error(capsys.readouterr().err, "config.yaml", "not valid YAML", one_line=False)  # + YAML's
    assert snapshot(run_dir) == before


def test_checkpoint_of_another_model_size(trained, tmp_path, capsys):
    """A run directory whose config.yaml was edited (model.hidden 32 → 16): the checkpoint does not fit."""
    run_dir = _copy(trained, tmp_path)
    config = (run_dir / "config.yaml").read_text()
    assert "hidden: 32" in config
    (run_dir / "config.yaml").write_text(config.replace("hidden: 32", "hidden: 16"))
    assert main(["train", "--resume", str(run_dir)]) == 2  # the edit is named
    assert_one_line_error(capsys.readouterr().err, "update_0000004", "model.hidden (32 → 16)", "--accept-config-changes")
    assert main(["train", "--resume", str(run_dir), "--accept-config-changes"]) == 2  # accepted, and does not fit
    assert_one_line_error(capsys.readouterr().err, "update_0000004", "does not match")


def test_resume_after_a_cut_metrics_line(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"update": 5, "loss": 0.1')  # the start of a record, cut short
    config = load_config(run_dir / "config.yaml")
    Trainer.from_config(config.model_copy(update={"train": config.train.model_copy(update={"updates": 6})}), run_dir,
            progress=False).train(resume=True)
    assert [r["update"] for r in training_records(run_dir)] == list(range(1, 7))


# -- reward weights missing offline ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,message",
    [
        (["reward.kind=aesthetic", "reward.clip_model=/nonexistent/clip"], r"reward\.clip_model.*/nonexistent/clip"),
        (["reward.kind=aesthetic", "reward.clip_model=nablagfn-tests/no-such-clip"],
         r"reward\.clip_model.*nablagfn-tests/no-such-clip.*HF_HUB_OFFLINE=1"),
        (["reward.kind=imagereward", "reward.checkpoint=nablagfn-tests/none:ImageReward.pt"],
         r"reward\.checkpoint.*ImageReward\.pt.*nablagfn-tests/none.*HF_HUB_OFFLINE=1"),
        (["reward.kind=pickscore", "reward.model=nablagfn-tests/no-such-pickscore"],
         r"reward\.model.*nablagfn-tests/no-such-pickscore.*HF_HUB_OFFLINE=1"),
    ],
    ids=["aesthetic-local", "aesthetic-hub", "imagereward-hub", "pickscore-hub"],
)
def test_reward_weights_missing_offline(settings, message):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest
    with pytest.raises(ConfigError, match=message):
        build_reward(load_config(None, ["model.kind=digits", *settings]).reward)


def test_reward_weights_missing_offline_on_the_command_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--out", str(run_dir), "--no-progress", "model.kind=digits", "reward.kind=aesthetic",
                 f"reward.clip_model={tmp_path / 'clip'}"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "reward.clip_model", str(tmp_path / "clip"))
    assert not run_dir.exists()


# -- a failure while writing a checkpoint (disk full) ------------------------------------------------------------------


class DiskFull:
    """``save_file`` that raises ENOSPC at the ``fail_at``-th file written into the second checkpoint directory."""

    def __init__(self, save_file, fail_at: int):
        self.save_file, self.fail_at = save_file, fail_at
        self.directories: list[Path] = []
        self.written_in_second = 0

    def __call__(self, tensors, filename, *args, **kwargs):
        directory = Path(filename).parent
        if directory not in self.directories:
            self.directories.append(directory)
        if len(self.directories) == 2:
            self.written_in_second += 1
            if self.written_in_second == self.fail_at:
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return self.save_file(tensors, filename, *args, **kwargs)


@pytest.mark.parametrize("fail_at", [1, 2], ids=["first-file", "second-file"])
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, fail_at):
    config = load_config(None, [*SMALL, "train.updates=6", "train.checkpoint_every=3"])
    failing = DiskFull(checkpoint_module.save_file, fail_at)
    monkeypatch.setattr(checkpoint_module, "save_file", failing)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoints are intact"):
        Trainer.from_config(config, run_dir, progress=False).train()
    # the previous checkpoint is intact and nothing half-written looks like a checkpoint
    assert [p.name for p in list_checkpoints(run_dir)] == ["update_0000003"]
    previous = list_checkpoints(run_dir)[0]
    for path in previous.glob("*.safetensors"):
        load_file(path)
    json.loads((previous / "state.json").read_text())
    # once there is space again, resuming from it ends exactly where an uninterrupted run ends
    monkeypatch.setattr(checkpoint_module, "save_file", failing.save_file)
    Trainer.from_config(config, run_dir, progress=False).train(resume=True)
    Trainer.from_config(config, tmp_path / "reference", progress=False).train()
    final, reference = list_checkpoints(run_dir)[-1], list_checkpoints(tmp_path / "reference")[-1]
    assert final.name == reference.name == "update_0000006"
    assert model_tensors_equal(load_model_tensors(final), load_model_tensors(reference))
    assert [r["update"] for r in training_records(run_dir)] == list(range(1, 7))


def test_disk_full_leaves_no_staging_directory(tmp_path, monkeypatch):
    config = load_config(None, [*SMALL, "train.updates=6", "train.checkpoint_every=3"])
    monkeypatch.setattr(checkpoint_module, "save_file", DiskFull(checkpoint_module.save_file, 2))
    with pytest.raises(CheckpointError):
        Trainer.from_config(config, tmp_path, progress=False).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["update_0000003"]


# -- NaN rewards -------------------------------------------------------------------------------------------------------


def poison_reward(monkeypatch, poisoned) -> None:
    """Make the Gaussian reward NaN (value and gradient) for the first sample of every batch scored with gradients
    (the training losses; sampling and evaluation stay finite) while ``poisoned()`` is true."""
    log_reward = GaussianReward.log_reward

    def nan_for_some(self, y, cond):
        value = log_reward(self, y, cond)
        if torch.is_grad_enabled() and y.requires_grad and poisoned():
            poison = torch.zeros(len(y), dtype=y.dtype, device=y.device)
            poison[0] = float("nan")
            value = value + poison * y.flatten(1).sum(1)  # NaN for sample 0 only, and NaN gradient for it
        return value

    monkeypatch.setattr(GaussianReward, "log_reward", nan_for_some)


def test_nan_reward_skips_the_update_without_touching_the_weights(tmp_path, monkeypatch):
    config = load_config(None, [*SMALL, "train.updates=6", "train.checkpoint_every=1", "train.keep_checkpoints=10"])
    trainer = Trainer.from_config(config, tmp_path, progress=False)
    poison_reward(monkeypatch, lambda: trainer.step in (2, 3))  # during updates 3 and 4
    trainer.train()

    log = training_records(tmp_path)
    assert [r["update"] for r in log] == list(range(1, 7))
    assert [r["update"] for r in log if r.get("skipped_nonfinite")] == [3, 4]
    assert all(r["loss"] == r["loss"] for r in log if not r.get("skipped_nonfinite"))  # finite where not skipped
    # every update writes a checkpoint but the skipped ones (during a streak the last good checkpoint stays the
    # latest); a skipped update leaves the networks and the optimiser state as they were
    checkpoints = {int(p.name.removeprefix("update_")): p for p in list_checkpoints(tmp_path)}
    assert sorted(checkpoints) == [1, 2, 5, 6]

    def files(update: int) -> dict[str, dict[str, torch.Tensor]]:
        return {p.name: load_file(p) for p in checkpoints[update].glob("*.safetensors")
                if p.name in ("model.safetensors", "optimizers.safetensors")}

    for previous, update in ((1, 2), (2, 5), (5, 6)):
        before, after = files(previous), files(update)
        same = {name: model_tensors_equal(before[name], after[name]) for name in before}
        assert not any(same.values()), (update, same)  # 2 → 5: one real update (5) after the two skipped ones


def test_nan_every_time_stops_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    config = load_config(None, [*SMALL, "train.updates=12", "train.checkpoint_every=3", "train.max_nonfinite_updates=3"])
    trainer = Trainer.from_config(config, tmp_path, progress=False)
    poison_reward(monkeypatch, lambda: trainer.step >= 3)  # from update 4 on
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert "3 updates in a row" in message and str(tmp_path / "checkpoints") in message
    # updates 4 and 5 were skipped (and logged), update 6 stopped the run before writing anything
    assert [(r["update"], bool(r.get("skipped_nonfinite"))) for r in training_records(tmp_path)] == [
        (1, False), (2, False), (3, False), (4, True), (5, True)]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["update_0000003"]
    # the last good checkpoint holds exactly the weights the run had when it stopped (no NaN reached them)
    saved = load_model_tensors(list_checkpoints(tmp_path)[0])
    live = {**{f"policy.{k}": v for k, v in trainer.run.backend.adapter_state_dict().items()},
            **{f"method.{k}": v for k, v in trainer.run.method.networks.state_dict().items()}}
    assert model_tensors_equal(saved, {k: v.detach() for k, v in live.items()})
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_nan_every_time_on_the_command_line(tmp_path, monkeypatch, capsys):
    poison_reward(monkeypatch, lambda: True)
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", *SMALL, "train.updates=4",
                 "train.max_nonfinite_updates=2"]) == 2
    assert_one_line_error(capsys.readouterr().err, "2 updates in a row", "no checkpoint was written yet")


# -- a gradient method with a reward without gradients -----------------------------------------------------------------


def test_gradient_method_with_non_differentiable_reward_fails_before_any_work(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"method\.name: refl needs reward gradients.*reward\.kind="
                                          r"jpeg_compressibility is not differentiable.*ddpo"):
        load_config(None, ["model.kind=digits", "reward.kind=jpeg_compressibility", "method.name=refl"])
    assert load_config(None, ["model.kind=digits", "reward.kind=jpeg_compressibility", "method.name=ddpo"])

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr("nablagfn.train.run.Run.build", no_build)
    run_dir = tmp_path / "run"
    code = main(["train", "--out", str(run_dir), "model.kind=digits", "reward.kind=jpeg_compressibility",
                 "method.name=refl"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "method.name: refl", "reward.kind=jpeg_compressibility",
                          one_line=False)
    assert not run_dir.exists()


# -- nothing is unpickled from untrusted files -------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: stands for any code hidden in a weights file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _booby_trapped(path: Path, marker: Path, key: str) -> Path:
    torch.save({key: _Payload(marker)}, path)
    return path


def test_the_payload_would_run_if_unpickled(tmp_path):
    path = _booby_trapped(tmp_path / "head.pth", tmp_path / "ran", "layers.0.weight")
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").is_dir()


def test_reward_and_feature_weights_with_pickled_code_are_refused(tmp_path, monkeypatch):
    from nablagfn.eval import features
    from nablagfn.rewards.clip_rewards import AestheticHead

    marker = tmp_path / "ran"
    head = _booby_trapped(tmp_path / "head.pth", marker, "layers.0.weight")
    with pytest.raises(ConfigError, match=r"reward\.head.*head\.pth"):
        AestheticHead.load(head, "reward.head")

    checkpoint = _booby_trapped(tmp_path / "ImageReward.pt", marker, "blip.visual_encoder.cls_token")
    with pytest.raises(ConfigError, match=r"reward\.checkpoint.*ImageReward\.pt.*not an ImageReward checkpoint"):
        build_reward(load_config(None, ["model.kind=digits", "reward.kind=imagereward",
                                        f"reward.checkpoint={checkpoint}", f"reward.tokenizer={tmp_path}"]).reward)

    # torch-fidelity would torch.load the Inception weights without weights_only (a full unpickle before torch 2.6)
    monkeypatch.setattr(features, "_has_torch_fidelity", lambda: True)
    inception = _booby_trapped(tmp_path / "inception.pth", marker, "Conv2d_1a_3x3.conv.weight")
    with pytest.raises(ConfigError, match=r"eval\.features_path.*inception\.pth.*UnpicklingError"):
        features._load_inception(str(inception))
    assert not marker.exists()


def test_a_skipped_update_leaves_weights_and_optimiser_untouched(tmp_path, monkeypatch):
    trainer = Trainer.from_config(load_config(None, [*SMALL, "train.updates=6"]), tmp_path, progress=False)
    poison_reward(monkeypatch, lambda: trainer.step == 2)
    trainer.update()
    trainer.update()
    weights = {k: v.clone() for k, v in trainer.run.backend.adapter_state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizers["policy"].state.values()]
    assert trainer.update()["skipped_nonfinite"] == 1
    assert all(torch.equal(v, weights[k]) for k, v in trainer.run.backend.adapter_state_dict().items())
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(trainer.optimizers["policy"].state.values(), moments))
    assert "skipped_nonfinite" not in trainer.update()  # and the next one trains again


def test_weights_that_blow_up_stop_the_run_at_once(tmp_path, capsys):
    """Finite loss and gradients, but a step of 1e30 (lr=1e30): before, the weights became 1e30, the following
    updates were skipped as non-finite, and the run ended with exit 0 and NaN metrics. Now the update that moves the
    weights by more than train.max_relative_step times their norm stops the run, before any checkpoint holds them."""
    run_dir = tmp_path / "run"
    args = ["train", "--out", str(run_dir), "--no-progress", *SMALL, "train.updates=6", "train.checkpoint_every=1",
            "train.policy_optimizer.lr=1e30", "train.policy_optimizer.grad_clip=null"]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr().err, "update 1", "train.max_relative_step=10", "no checkpoint")
    assert list_checkpoints(run_dir) == []
