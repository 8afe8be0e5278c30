"""Training: building a run from its config, Algorithm 1's loop, checkpoints."""
