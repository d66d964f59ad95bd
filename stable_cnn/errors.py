"""Errors meant for people: one line that names the problem and the fix; and the exit
status each way a command can end (docs/runs.md, "Exit status")."""

EXIT_FINISHED = 0
EXIT_FAILED = 1  # the run diverged (NaN/Inf), or something failed that is not the input
EXIT_BAD_INPUT = 2  # a mistake in the config, data or a file given: the line names the fix
EXIT_PREEMPTED = 75  # a signal stopped it after saving: EX_TEMPFAIL, resume continues it


class UserError(Exception):
    """A mistake in the input (config, data, checkpoint); reported as one line."""

    exit_code = EXIT_BAD_INPUT

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

    exit_code = EXIT_FAILED
