"""Errors meant for people: one line that names the problem and the fix."""


class UserError(Exception):
    """A mistake in the input (config, data, checkpoint); reported as one line, exit 2."""

    exit_code = 2

    def __str__(self) -> str:
        text = super().__str__()
        # Raised in a DataLoader worker, it comes back with the worker's traceback in its
        # message ("Caught DataError in DataLoader worker process 0 ..."): the last line
        # is ours.
        if "Original Traceback" in text:
            return text.rstrip().splitlines()[-1].split(": ", 1)[-1]
        return text


class ConfigError(UserError, ValueError):
    """A config value that composes but is out of range or inconsistent."""


class DataError(UserError):
    """A dataset that is missing, empty or inconsistent."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run stops with its checkpoint saved."""
