"""Sample metrics: diversity and FID to the pretrained model (per prompt), their feature extractors and config."""

from __future__ import annotations

import importlib.util
import math
import typing
from pathlib import Path

import pytest
import torch

from nablagfn.config import EvalConfig
from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.eval.features import DREAMSIM_FILES, ClassifierFeatures, ClipFeatures, build_features
from nablagfn.eval.metrics import diversity, frechet_distance, grouped_frechet_distance, mean_pairwise_distance
from nablagfn.rewards import build_reward
from nablagfn.train.run import Run


def _gaussian(n: int, mean: list[float], std: list[float], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=generator, dtype=torch.float64) * torch.tensor(std) + torch.tensor(mean)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_diversity_is_zero_for_identical_samples_and_grows_with_spread(distance):
    one_group = torch.zeros(50, dtype=torch.long)
    assert diversity(torch.ones(50, 8), one_group, distance) == pytest.approx(0, abs=1e-12)
    spreads = [diversity(1 + scale * _gaussian(50, [0.0] * 8, [1.0] * 8, seed=1), one_group, distance)
               for scale in (0.01, 0.1, 1.0)]
    assert 0 < spreads[0] < spreads[1] < spreads[2]
    assert mean_pairwise_distance(torch.tensor([[0.0], [1.0]])) == pytest.approx(1.0)
    assert mean_pairwise_distance(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "cosine") == pytest.approx(1.0)


def test_frechet_distance_matches_the_gaussian_closed_form():
    a = _gaussian(20_000, [0.0, 0.0, 0.0], [1.0, 2.0, 0.5], seed=0)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    # diagonal Gaussians: ‖μ_a − μ_b‖² + Σ_i (σ_a,i − σ_b,i)²
    for shift, std in ((0.5, [1.0, 2.0, 0.5]), (2.0, [1.0, 2.0, 0.5]), (1.0, [2.0, 1.0, 1.5])):
        b = _gaussian(20_000, [shift, 0.0, -shift], std, seed=1)
        exact = 2 * shift**2 + sum((s_a - s_b) ** 2 for s_a, s_b in zip([1.0, 2.0, 0.5], std))
        assert frechet_distance(a, b) == pytest.approx(exact, rel=0.03, abs=0.01)
    distances = [frechet_distance(a, a + shift) for shift in (0.1, 1.0, 3.0)]
    assert distances == pytest.approx([3 * 0.01, 3 * 1.0, 3 * 9.0], rel=1e-6)


def test_metrics_average_over_prompts_and_skip_prompts_with_one_sample():
    same = torch.ones(20, 4)
    spread = _gaussian(20, [0.0] * 4, [1.0] * 4, seed=2)
    groups = torch.tensor([0] * 10 + [1] * 10)
    # identical within each prompt: no diversity, though the two prompts differ
    assert diversity(torch.cat([same[:10], 2 * same[10:]]), groups, "euclidean") == pytest.approx(0, abs=1e-12)
    mixed = torch.cat([same[:10], spread[:10]])
    assert diversity(mixed, groups, "euclidean") == pytest.approx(mean_pairwise_distance(spread[:10]) / 2)
    lone = torch.tensor([0] * 10 + [1] * 9 + [2])  # prompt 2 has one sample: left out
    assert diversity(mixed, lone, "euclidean") == pytest.approx(mean_pairwise_distance(spread[:9]) / 2)
    assert math.isnan(diversity(mixed[:3], torch.tensor([0, 1, 2]), "euclidean"))

    reference = _gaussian(20, [0.0] * 4, [1.0] * 4, seed=3)
    ours = torch.cat([reference[:10], reference[10:] + 1.0])  # prompt 0 unchanged, prompt 1 shifted by 1
    per_prompt = [frechet_distance(reference[:10], ours[:10]), frechet_distance(reference[10:], ours[10:])]
    assert per_prompt[0] == pytest.approx(0, abs=1e-9) and per_prompt[1] == pytest.approx(4.0, rel=1e-6)
    assert grouped_frechet_distance(ours, groups, reference, groups) == pytest.approx(sum(per_prompt) / 2)
    shuffled = torch.randperm(20, generator=torch.Generator().manual_seed(0))  # order does not matter
    assert grouped_frechet_distance(ours[shuffled], groups[shuffled], reference, groups) == pytest.approx(2.0)
    # prompt 0 has one pretrained sample, prompt 1 none: nothing left to average
    assert math.isnan(grouped_frechet_distance(ours, groups, reference[:11], torch.tensor([0] + [2] * 10)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from test_rewards_clip import _save_clip, _save_preprocessor, _save_tokenizer

    directory = tmp_path_factory.mktemp("eval_clip")
    _save_clip(directory, 16, seed=0)
    _save_tokenizer(directory)
    _save_preprocessor(directory)
    return directory


def _features(*overrides: str):
    config = load_config(None, list(overrides))
    return build_features(config, build_reward(config.reward))


def test_digits_features_default_to_the_reward_classifier():
    config = load_config(None, ["eval.batch_size=4"])
    reward = build_reward(config.reward)
    extractor = build_features(config, reward)
    assert isinstance(extractor, ClassifierFeatures) and extractor.classifier is reward.classifier
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(extractor(images), reward.classifier.features(images))
    pixels = _features("eval.features=pixels")
    assert pixels.distance == "euclidean" and torch.equal(pixels(images), images.flatten(1))
    assert build_features(load_config(None, ["model.kind=gmm"]), None) is None  # exact-target metrics instead


def test_clip_features_load_a_saved_model_and_give_unit_embeddings(clip_dir):
    extractor = _features("eval.features=clip", f"eval.features_path={clip_dir}", "eval.batch_size=3")
    assert isinstance(extractor, ClipFeatures) and extractor.distance == "cosine"
    images = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # grayscale digits, resized
    features = extractor(images)
    assert features.shape == (7, 16) and not features.requires_grad
    torch.testing.assert_close(features.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(features[3:5], extractor(images[3:5]))  # batching does not change features
    # Stable Diffusion with a CLIP reward: auto reuses the reward's own encoder
    config = load_config(None, ["model.kind=stable_diffusion", "reward.kind=clip", f"reward.model={clip_dir}"])
    reward = build_reward(config.reward)
    assert build_features(config, reward).encoder is reward.encoder
    with pytest.warns(UserWarning, match="no CLIP at hand"):
        assert _features("model.kind=stable_diffusion", "reward.kind=brightness") is None


def test_missing_weights_name_the_key_and_the_fallback(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.features_path.*nowhere.*eval\.features=auto"):
        _features("eval.features=clip", f"eval.features_path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"(?s)eval\.features_path.*gone\.safetensors.*eval\.features=auto"):
        _features("eval.features=classifier", f"eval.features_path={tmp_path / 'gone.safetensors'}")
    with pytest.raises(ConfigError, match=r"(?s)eval\.features_path.*dino_vitb16_pretrain\.pth.*eval\.features=auto"):
        _features("eval.features=dreamsim", f"eval.features_path={tmp_path}")
    with pytest.raises(ConfigError, match=r"(?s)eval\.features_path.*inception\.pth.*eval\.features=auto"):
        _features("eval.features=inception", f"eval.features_path={tmp_path / 'inception.pth'}")
    with pytest.raises(ConfigError, match=r"eval\.features_path: eval\.features=dreamsim needs"):
        load_config(None, ["eval.features=dreamsim"])
    with pytest.raises(ConfigError, match=r"eval\.features: 'classifier' is for the 8×8 digits"):
        load_config(None, ["model.kind=stable_diffusion", "eval.features=classifier"])
    if importlib.util.find_spec("dreamsim") is None:  # weights there, package missing: says how to get it
        for name in DREAMSIM_FILES:
            (tmp_path / name).touch()
        with pytest.raises(ConfigError, match=r"(?s)pip install dreamsim.*eval\.features=auto"):
            _features("eval.features=dreamsim", f"eval.features_path={tmp_path}")
    if importlib.util.find_spec("torch_fidelity") is None:
        (tmp_path / "inception.pth").touch()
        with pytest.raises(ConfigError, match=r"(?s)pip install torch-fidelity.*eval\.features=auto"):
            _features("eval.features=inception", f"eval.features_path={tmp_path / 'inception.pth'}")


def test_every_eval_key_is_documented():
    text = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    for key in EvalConfig.model_fields:
        assert f"`eval.{key}`" in text, key
    for kind in typing.get_args(EvalConfig.model_fields["features"].annotation):
        assert f"`{kind}`" in text, kind


def test_digits_evaluation_reports_diversity_and_fid_with_pretrained_samples_drawn_once(monkeypatch):
    run = Run.build(load_config(None, ["sampler.steps=5"]))
    pretrained_rollouts = []
    rollout = run.rollout

    def counting_rollout(cond, generator, finetuned=True, record=True):
        if not finetuned:
            pretrained_rollouts.append(len(cond))
        return rollout(cond, generator, finetuned, record)

    monkeypatch.setattr(run, "rollout", counting_rollout)
    start = run.evaluate(64, seed=5)
    assert {"diversity", "fid_to_pretrained", "diversity_real_class", "fd_to_class"} <= start.keys()
    assert all(math.isfinite(value) for value in start.values())
    assert start["diversity"] > 0 and start["fid_to_pretrained"] > 0  # independent noise: the finite-sample floor
    for lora in run.backend.trainable_parameters():  # a finetuned model far from the pretrained one
        lora.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(lora.numel()))
    moved = run.evaluate(64, seed=5)
    assert moved["fid_to_pretrained"] > 2 * start["fid_to_pretrained"]
    assert run.evaluate(64, seed=5, finetuned=False) == pytest.approx(start)  # the adapter is off
    assert pretrained_rollouts == [64, 64]  # the reference, once, and the pretrained model's own samples
