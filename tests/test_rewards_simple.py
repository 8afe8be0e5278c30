"""Weight-free rewards (brightness, JPEG) and the digits classifier reward."""

import pytest
import torch
from safetensors.torch import save_file

from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.rewards import build_reward
from nablagfn.rewards.classifier import DigitClassifier


def _reward(*overrides):
    return build_reward(load_config(None, ["model.kind=digits", *overrides]).reward)


def test_brightness_is_mean_intensity_with_a_gradient():
    reward = _reward("reward.kind=brightness")
    images = torch.rand(4, 3, 16, 16, requires_grad=True)
    values = reward.log_reward(images, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(values, images.mean((1, 2, 3)))
    values.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / (3 * 16 * 16)))


def test_jpeg_noise_is_less_compressible_than_a_flat_image():
    gradient_free = "method.name=ddpo"  # a method that needs no reward gradients (the others are refused)
    compress = _reward("reward.kind=jpeg_compressibility", gradient_free)
    incompress = _reward("reward.kind=jpeg_incompressibility", gradient_free)
    images = torch.stack([torch.full((3, 32, 32), 0.5), torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))])
    cond = torch.zeros(2, dtype=torch.long)
    sizes = incompress.log_reward(images, cond)
    assert sizes[1] > 2 * sizes[0] > 0
    torch.testing.assert_close(compress.log_reward(images, cond), -sizes)
    assert not compress.differentiable


def test_gradient_methods_refuse_jpeg_with_a_clear_error():
    with pytest.raises(ConfigError, match="not differentiable"):
        load_config(None, ["model.kind=digits", "reward.kind=jpeg_compressibility"])


def test_classifier_reward_is_the_log_probability_of_the_digit(tmp_path):
    classifier = DigitClassifier()
    path = tmp_path / "classifier.safetensors"
    save_file(classifier.state_dict(), str(path))
    reward = _reward("reward.kind=classifier", "reward.digit=3", f"reward.weights={path}")
    images = torch.rand(5, 1, 8, 8, requires_grad=True)
    values = reward.log_reward(images, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(values, torch.log_softmax(classifier(images), 1)[:, 3])
    (grad,) = torch.autograd.grad(values.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_missing_classifier_weights_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.weights.*nope\.safetensors.*pretrain classifier"):
        _reward("reward.kind=classifier", f"reward.weights={tmp_path / 'nope.safetensors'}")


def test_classifier_reward_needs_the_digits_model():
    with pytest.raises(ConfigError, match="needs model.kind=digits"):
        load_config(None, ["model.kind=stable_diffusion", "reward.kind=classifier"])
