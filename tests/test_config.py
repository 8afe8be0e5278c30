"""Config loading and validation: every error names the offending key."""

from __future__ import annotations

import pytest
import yaml

from nablagfn.config import ConfigError, NablaDBConfig, ResidualNablaDBConfig, RunConfig
from nablagfn.config_loading import MODEL_PRESETS, dump_config, load_config, parse_override, validate_config

GMM = ["model.kind=gmm"]


def test_defaults_are_the_digits_model_toward_a_class():
    config = load_config(None, [])
    assert isinstance(config, RunConfig)
    assert isinstance(config.method, ResidualNablaDBConfig)
    assert config.model.kind == "digits" and config.reward.kind == "classifier"
    assert config.method.beta == 1.0 and config.method.prior_strength == 1.0  # target p(x | digit)
    assert config.train.updates == MODEL_PRESETS["digits"]["train"]["updates"]
    # the defaults round-trip through their own YAML dump
    assert validate_config(yaml.safe_load(dump_config(config))) == config


def test_gmm_defaults_validate():
    config = load_config(None, GMM)
    assert config.model.kind == "gmm" and config.model.dim == 2
    assert len(config.model.means) == len(config.model.stds) == 8
    assert config.reward.kind == "gaussian"
    assert config.method.beta == 0.5 and config.train.updates == 1500
    assert validate_config(yaml.safe_load(dump_config(config))) == config


def test_model_presets_sit_beneath_the_users_values():
    config = load_config(None, ["model.kind=digits", "train.updates=7", "method.beta=2"])
    assert config.train.updates == 7 and config.method.beta == 2
    assert config.train.batch_size == MODEL_PRESETS["digits"]["train"]["batch_size"]
    # the default reward follows the model
    assert load_config(None, ["model.kind=stable_diffusion"]).reward.kind == "aesthetic"


def test_rewards_must_suit_the_model():
    assert "reward.kind" in _error(["model.kind=digits", "reward.kind=gaussian"])
    assert "reward.kind" in _error(["model.kind=gmm", "reward.kind=aesthetic"])
    assert "model.kind=digits" in _error(["model.kind=stable_diffusion", "reward.kind=classifier"])


def test_override_sets_value_with_yaml_typing():
    config = load_config(None, [*GMM, "method.beta=2.0", "train.updates=7", "sampler.kind=dpm_solver", "train.on_policy=true",
                                "reward.center=[1.0, -1.0]"])
    assert config.method.beta == 2.0
    assert config.train.updates == 7 and isinstance(config.train.updates, int)
    assert config.sampler.kind == "dpm_solver"
    assert config.train.on_policy is True
    assert config.reward.center == [1.0, -1.0]
    # later overrides win
    assert load_config(None, [*GMM, "method.beta=2.0", "method.beta=3.0"]).method.beta == 3.0


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n"
        "  kind: gmm\n"
        "  means: [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]\n"
        "  stds: [0.3, 0.3, 0.5]\n"
        "  weights: [1, 2, 1]\n"
        "reward:\n"
        "  kind: linear\n"
        "  direction: [0.5, 0.5]\n"
        "method:\n"
        "  beta: 1.5\n"
        "train:\n"
        "  updates: 20\n"
    )
    config = load_config(path)
    assert config.model.means == [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]
    assert config.model.stds == [0.3, 0.3, 0.5]
    assert config.model.weights == [1, 2, 1]
    assert config.reward.kind == "linear" and config.reward.direction == [0.5, 0.5]
    assert config.method.beta == 1.5 and config.method.name == "residual_nabla_db"
    assert config.train.updates == 20
    assert config.sampler.steps == 50  # untouched default
    assert load_config(path, ["method.beta=0.25"]).method.beta == 0.25
    # an empty file is the defaults
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config(None)


def _error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_unknown_key_is_named():
    message = _error([*GMM, "method.betaa=1"])
    assert "method.betaa" in message
    assert "unknown" in message
    assert "model.betaa" not in message
    assert "train.nonsense" in _error([*GMM, "train.nonsense=1"])
    assert "bogus" in _error([*GMM, "bogus.key=1"])


def test_wrong_type_is_named():
    message = _error([*GMM, "train.updates=abc"])
    assert "train.updates" in message
    assert "sampler.steps" in _error([*GMM, "sampler.steps=[1, 2]"])


def test_out_of_range_is_named():
    assert "method.beta" in _error([*GMM, "method.beta=-1"])
    assert "method.beta" in _error([*GMM, "method.beta=0"])
    assert "sampler.steps" in _error([*GMM, "sampler.steps=0"])
    assert "method.subsample.fraction" in _error([*GMM, "method.subsample.fraction=1.5"])


def test_invalid_literal_is_named():
    assert "sampler.kind" in _error([*GMM, "sampler.kind=euler"])
    assert "method.reverse_target" in _error([*GMM, "method.reverse_target=bogus"])


def test_inconsistent_shapes_are_named():
    message = _error([*GMM, "model.stds=[1.0]"])
    assert "model.stds" in message and "8" in message
    assert "model.weights" in _error([*GMM, "model.weights=[1.0, 2.0]"])
    assert "model.means" in _error([*GMM, "model.means=[[0.0, 0.0], [1.0]]", "model.stds=[1.0, 1.0]"])
    assert "model.stds" in _error([*GMM, "model.stds=[0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, -0.3]"])


def test_reward_dimension_mismatch_is_named():
    assert "reward.center" in _error([*GMM, "reward.center=[1.0, 2.0, 3.0]"])
    assert "reward.direction" in _error([*GMM, "reward.kind=linear", "reward.direction=[1.0]"])
    # consistent in 3-D is fine
    config = load_config(None, [*GMM, "model.means=[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]", "model.stds=[0.5, 0.5]",
                                "reward.center=[1.0, 2.0, 3.0]"])
    assert config.model.dim == 3


def test_train_batch_divisibility_is_named():
    message = _error([*GMM, "train.trajectories_per_epoch=30", "train.batch_size=8"])
    assert "train.trajectories_per_epoch" in message


def test_second_order_needs_sampled_target():
    assert "method.second_order" in _error([*GMM, "method.second_order=true", "method.reverse_target=expected"])
    assert load_config(None, [*GMM, "method.second_order=true", "method.reverse_target=sampled"]).method.second_order


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [*GMM, "method.beta"])
    with pytest.raises(ConfigError):
        load_config(None, [*GMM, "=3"])
    with pytest.raises(ConfigError):
        load_config(None, [*GMM, "method..beta=3"])
    with pytest.raises(ConfigError):
        load_config(None, [*GMM, "method.beta=2", "method.beta.x=1"])  # beta is a value, not a section
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_bad_files(tmp_path):
    assert "does not exist" in _error([], tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "YAML" in _error([], bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    _error([], scalar)


def test_method_name_switches_schema():
    config = load_config(None, [*GMM, "method.name=nabla_db"])
    assert isinstance(config.method, NablaDBConfig)
    assert config.method.name == "nabla_db"
    # keys of the other method are rejected
    assert "method.prior_strength" in _error([*GMM, "method.name=nabla_db", "method.prior_strength=0.5"])
    message = _error([*GMM, "method.name=bogus"])
    assert "method.name" in message and "bogus" in message and "nabla_db" in message
    message = _error([*GMM, "reward.kind=bogus"])
    assert "reward.kind" in message and "gaussian" in message


def test_config_is_validated_on_assignment():
    config = load_config(None, GMM)
    with pytest.raises(ValueError):
        config.method.beta = -1.0


def test_every_method_key_is_documented():
    """docs/config.md lists every key of every method (a new key without docs fails here)."""
    import typing
    from pathlib import Path

    from pydantic import BaseModel

    from nablagfn.config import MethodConfig

    text = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    union = typing.get_args(MethodConfig)[0] if typing.get_origin(MethodConfig) is typing.Annotated else MethodConfig
    for cls in typing.get_args(union):
        assert f"`method.name: {cls.model_fields['name'].default}`" in text
        for key, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            nested = type(default).model_fields if isinstance(default, BaseModel) else {}
            for name in [f"{key}.{sub}" for sub in nested] or [key]:
                assert name == "name" or f"`method.{name}`" in text, f"method.{name} ({cls.__name__})"


def test_stable_diffusion_presets_per_model_and_reward():
    """Stable Diffusion without --config gets the paper's one-GPU settings and an image-sized evaluation (it got the
    mixture's 256-trajectory batches and 4,000 evaluation samples, with fp16 weights on a CPU); β and λ follow the
    reward where the paper sets them; the user's values win; model.dtype=auto is fp32 on a CPU."""
    sd = ["model.kind=stable_diffusion"]
    config = load_config(None, sd)
    assert config.reward.kind == "aesthetic" and (config.method.beta, config.method.output_reg) == (1e4, 1e3)
    train = config.train
    assert (train.trajectories_per_epoch, train.batch_size, train.accumulation, train.eval_samples) == (64, 2, 16, 64)
    assert config.model.dtype == "fp32" and "dtype: fp32" in dump_config(config)
    hps = load_config(None, [*sd, "reward.kind=hpsv2"]).method
    assert (hps.beta, hps.output_reg) == (1e4, 1e2)
    assert load_config(None, [*sd, "reward.kind=imagereward"]).method.beta == 1e3
    brightness = load_config(None, [*sd, "reward.kind=brightness"]).method
    assert (brightness.beta, brightness.output_reg) == (0.5, 0.0)  # no paper setting: the method's defaults
    mine = load_config(None, [*sd, "method.beta=3", "train.eval_samples=8", "model.dtype=bf16"])
    assert (mine.method.beta, mine.train.eval_samples, mine.model.dtype) == (3.0, 8, "bf16")
    assert load_config(None, [*sd, "method.name=ddpo"]).train.batch_size == 2  # method keys only where they exist


def test_sizing_the_batches_drops_the_presets_accumulation():
    config = load_config(None, ["model.kind=stable_diffusion", "train.trajectories_per_epoch=4"])
    assert (config.train.trajectories_per_epoch, config.train.batch_size, config.train.accumulation) == (4, 2, 1)
