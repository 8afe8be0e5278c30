"""How close the pretrained digits models' samples are to the real digits: the DDPM and the rectified flow.

For each model and sampler setting (``kind:steps[:noise_level]``; ``ddpm`` samples the DDPM, the ``flow_*`` kinds the
flow model; ``flow_sde`` at noise level 0 is its Euler ODE, for reference only: it has no log-probabilities to train
with), samples ``--num`` images from the pretrained model (adapter off) and prints the Fréchet distance to all 1,797
real digits in the shipped classifier's 64-d features (the features of ``nablagfn eval``'s FD to the real class), the
share of each class by the classifier's argmax, the largest gap of a class share to the real 0.1, the share the
classifier is confident about (max p > 0.9), the pixel diversity and the sampling time. The first row is the floor:
one random half of the real digits against the other.

    python benchmarks/digits_prior_quality.py --num 2000
    python benchmarks/digits_prior_quality.py --flow-weights runs/flow.safetensors --settings flow_sde:50:0.7
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nablagfn.backends import build_backend
from nablagfn.backends.digits import DigitsModelConfig, digits_split, load_digits_dataset
from nablagfn.eval.metrics import frechet_distance, mean_pairwise_distance
from nablagfn.mdp import make_kernel, rollout
from nablagfn.rewards.classifier import DigitClassifier, load_digit_classifier

#: kind:steps[:noise_level] — the DDPM's default, and the flow samplers at Flow-GRPO's a = 0.7 and below
DEFAULT_SETTINGS = [
    "ddpm:50", "ddpm:20", "ddpm:100", "flow_sde:50:0.7", "flow_sde:50:0.5", "flow_sde:50:0.3", "flow_sde:50:0.1",
    "flow_sde:20:0.7", "flow_sde:100:0.7", "flow_sde:20:0.3", "flow_sde:100:0.3", "flow_ddpm:50", "flow_cps:50:0.7",
    "flow_sde:50:0",
]

#: trajectories per sampling batch
CHUNK = 1000


@torch.no_grad()
def image_metrics(images: torch.Tensor, real: torch.Tensor, classifier: DigitClassifier) -> dict[str, float]:
    """FD to ``real`` in classifier features, class shares, confident share and pixel diversity of ``images``."""
    probabilities = torch.softmax(classifier(images), 1)
    shares = torch.bincount(probabilities.argmax(1), minlength=10).double() / len(images)
    return {
        "fd_to_real": frechet_distance(classifier.features(images), classifier.features(real)),
        "max_share_gap": (shares - 0.1).abs().max().item(),
        "confident": (probabilities.max(1).values > 0.9).double().mean().item(),
        "diversity_pixels": mean_pairwise_distance(images.flatten(1).double()),
        "class_shares": [round(v, 3) for v in shares.tolist()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="kind:steps[:noise_level]")
    parser.add_argument("--flow-weights", default=None, help="the flow model's safetensors (default: shipped)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    classifier = load_digit_classifier(None)
    images, _ = load_digits_dataset()
    first, second = digits_split(len(images), held_out=0.5)
    floor = image_metrics(images[first], images[second], classifier)
    rows = {"real half vs half": floor}
    print(f"{'setting':24s} {'FD':>7s} {'gap':>6s} {'conf':>6s} {'div':>6s} {'s':>5s}  class shares")
    print(f"{'real half vs half':24s} {floor['fd_to_real']:7.2f} {floor['max_share_gap']:6.3f} "
          f"{floor['confident']:6.3f} {floor['diversity_pixels']:6.3f}")
    for setting in args.settings:
        kind, steps, *level = setting.split(":")
        flow = kind.startswith("flow")
        config = DigitsModelConfig(parameterization="flow", weights=args.flow_weights) if flow else DigitsModelConfig()
        backend = build_backend(config)
        kernel = make_kernel(kind, backend.parameterization, int(steps), noise_level=float(level[0]) if level else 0.7)
        generator = torch.Generator().manual_seed(args.seed)
        started = time.perf_counter()
        sizes = [min(CHUNK, args.num - start) for start in range(0, args.num, CHUNK)]
        with torch.no_grad():
            states = torch.cat([
                rollout(backend, kernel, torch.zeros(size, dtype=torch.long), generator, finetuned=False, record=False)
                for size in sizes
            ])
        row = image_metrics(backend.decode(states), images, classifier) | {"seconds": time.perf_counter() - started}
        rows[setting] = row
        print(f"{setting:24s} {row['fd_to_real']:7.2f} {row['max_share_gap']:6.3f} {row['confident']:6.3f} "
              f"{row['diversity_pixels']:6.3f} {row['seconds']:5.0f}  {row['class_shares']}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
