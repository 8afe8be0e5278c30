"""Errors the command line reports as a message (exit code 2) instead of a traceback."""


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match the run."""


class NonFiniteLossError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient (each was skipped); the run stopped."""
