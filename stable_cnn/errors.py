"""Errors meant for people: one line that names the problem and the fix."""


class UserError(Exception):
    """A mistake in the input (config, data, checkpoint); reported as one line, exit 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value that composes but is out of range or inconsistent."""


class DataError(UserError):
    """A dataset that is missing, empty or inconsistent."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run stops with its checkpoint saved."""
