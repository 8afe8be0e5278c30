"""The built-in digits model: shipped weights, LoRA adapter, samples that look like digits, finetuning toward a class."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nablagfn.backends.digits import DigitsBackend, DigitsUNet, load_digits_dataset, load_digits_unet
from nablagfn.cli import main
from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.pretrain import pretrain_classifier, pretrain_digits
from nablagfn.rewards.classifier import load_digit_classifier
from nablagfn.shipped import shipped_weights
from nablagfn.train.run import Run

FAST = ["model.kind=digits", "sampler.steps=20", "train.eval_samples=64"]


@pytest.fixture(scope="module")
def backend() -> DigitsBackend:
    torch.manual_seed(0)
    return DigitsBackend(load_digits_unet(None))


def test_data_set_is_the_real_digits():
    images, labels = load_digits_dataset()
    assert images.shape == (1797, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_adapter_starts_as_the_pretrained_model_and_switches_off(backend):
    x, t = torch.randn(6, 1, 8, 8), torch.randint(0, 1000, (6,))
    cond = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(backend.eps(x, t, cond), backend.eps(x, t, cond, finetuned=False))
    trainable = backend.trainable_parameters()
    assert trainable and all("lora_" in name for name in backend.adapter_state_dict())
    assert {p for p in backend.parameters() if p.requires_grad} == set(trainable)
    saved = [p.detach().clone() for p in trainable]
    try:
        for p in trainable:
            p.data.normal_(0, 0.05)
        assert not torch.allclose(backend.eps(x, t, cond), backend.eps(x, t, cond, finetuned=False))
        pretrained = DigitsUNet()
        pretrained.load_state_dict(load_file(str(shipped_weights("digits_unet.safetensors"))))
        torch.testing.assert_close(backend.eps(x, t, cond, finetuned=False), pretrained(x, t))
    finally:
        for p, value in zip(trainable, saved):
            p.data.copy_(value)


def test_flow_score_net_starts_at_zero(backend):
    net = backend.make_flow_score_net()
    assert torch.equal(net(torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999])), torch.zeros(3, 1, 8, 8))


def test_pretrained_samples_look_like_digits_of_every_class():
    run = Run.build(load_config(None, ["model.kind=digits"]))
    images = run.decode(run.sample(300, seed=0, finetuned=False))
    classifier = load_digit_classifier(None)
    probabilities = torch.softmax(classifier(images), 1)
    confident = (probabilities.max(1).values > 0.9).float().mean().item()
    counts = torch.bincount(probabilities.argmax(1), minlength=10)
    assert confident > 0.7, confident  # the shipped classifier recognises most samples
    assert (counts >= 10).all(), counts  # every digit is there (the prior is diverse)


def test_shipped_classifier_recognises_held_out_digits():
    from nablagfn.backends.digits import digits_split

    images, labels = load_digits_dataset()
    _, held_out = digits_split(len(images))
    classifier = load_digit_classifier(None)
    accuracy = (classifier(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert accuracy > 0.93


def test_missing_digits_weights_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.weights.*gone\.safetensors.*pretrain digits"):
        Run.build(load_config(None, ["model.kind=digits", f"model.weights={tmp_path / 'gone.safetensors'}"]))


def test_pretraining_is_seeded_and_loads_as_model_weights(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pretrain_digits(first, steps=3, batch_size=8, progress=False)
    pretrain_digits(second, steps=3, batch_size=8, progress=False)
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = Run.build(load_config(None, ["model.kind=digits", f"model.weights={first}"]))
    assert torch.equal(run.backend.unet.conv_in.base_layer.weight, a["conv_in.weight"])
    classifier_path = tmp_path / "c.safetensors"
    result = pretrain_classifier(classifier_path, steps=3, batch_size=8, progress=False)
    assert 0 <= result["held_out_accuracy"] <= 1
    load_digit_classifier(str(classifier_path))


def test_pretrain_command_writes_weights(tmp_path, capsys):
    out = tmp_path / "cls.safetensors"
    assert main(["pretrain", "classifier", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file() and "reward.weights=" in capsys.readouterr().out


def test_finetuning_raises_the_class_probability(tmp_path):
    """A short residual ∇-DB run (β = 1) moves the digits model toward class 3."""
    run_dir = tmp_path / "run"
    overrides = [*FAST, "reward.digit=3", "train.updates=30", "train.eval_every=30", "train.checkpoint_every=30",
                 "train.eval_samples=200"]
    assert main(["train", "--out", str(run_dir), "--no-progress", *overrides]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = records[0], [r for r in records if "eval/class_accuracy" in r][-1]
    assert after["eval/log_reward_mean"] > before["eval/log_reward_mean"] + 0.5
    assert after["eval/class_accuracy"] > before["eval/class_accuracy"] + 0.1
    for name in ("samples.png", "curves.png", "eval.json"):
        assert (run_dir / name).is_file()
    # image runs write PNG files, or an array
    assert main(["sample", str(run_dir), "--num", "5", "--out", str(tmp_path / "pngs")]) == 0
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert main(["sample", str(run_dir), "--num", "5", "--out", str(tmp_path / "x.npy")]) == 0
    array = np.load(tmp_path / "x.npy")
    assert array.shape == (5, 1, 8, 8) and array.min() >= 0 and array.max() <= 1
