"""A reward module importable by name (``reward.function=api_rewards:ink``), as a user's own code would be."""

import torch


def ink(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """log R = 10 × the mean intensity of each image (or the sum of each state's coordinates)."""
    return 10 * images.flatten(1).mean(1)
