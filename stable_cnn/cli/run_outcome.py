"""How a training command ends, in one place: the exit status a user sees
(stable_cnn/errors.py: 0 finished, 1 diverged or failed, 2 bad input, 75 preempted), or
the value a sweeper is given for its job; the one line that says why; and the folder
Hydra made for a command that left no run in it removed. The run itself records how it
stopped (failure.json, the HPARAMS row, the tracker closed, every process past the
barrier) before it raises: training/fit.py ``fit``.

Every way stable-cnn-train runs goes through ``ended_command``: a single command, a
sweep's job, each process under torchrun or SLURM, and the ``trainer.devices``
launcher, which turns what its workers recorded into the same exceptions
(``workers_outcome``)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from stable_cnn.cli.run_folder import discard_if_unused
from stable_cnn.cli.sweeps import DIVERGED_VALUE
from stable_cnn.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_PREEMPTED,
    TrainingDiverged,
    UserError,
)
from stable_cnn.state.run_files import holds_a_record, read_failure, record_failure
from stable_cnn.studies.optuna_study import Pruned

log = logging.getLogger("stable_cnn")


class WorkersFailed(UserError):
    """The ``trainer.devices`` workers failed; their output above says why."""

    told = True  # a second error line would repeat theirs; a sweep's record keeps this one

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.crashed = exit_code != EXIT_BAD_INPUT  # not refused: a crash, or killed


def ended_command(
    command: Callable[[], float | Pruned], hydra_folder: Path, in_sweep: bool
) -> float | Pruned:
    """``command``'s best validation accuracy, or how its run ended as the sweeper's
    value (a sweep's job) or this process's exit status (a single command)."""
    from stable_cnn.training.fit import RunPreempted, TrialPruned

    crashed = False  # a crash keeps its folder (train.log) for the traceback's reader
    try:
        return command()
    except TrainingDiverged as err:
        say(log.error, "error: %s", err)
        if in_sweep:
            log.info("returning %s to the sweeper for this diverged job", DIVERGED_VALUE)
            return DIVERGED_VALUE
        exit_code = err.exit_code
    except TrialPruned as pruned:
        say(log.info, "%s: the search's pruner stopped this trial", pruned)
        return Pruned(pruned.after)
    except RunPreempted as stopped:
        say(log.warning, "%s", stopped)
        # an exit, not the exception: Hydra would record a failed job and start the next
        # one, but a signal (Ctrl-C, SLURM preemption) is meant for the whole sweep
        exit_code = EXIT_PREEMPTED
    except UserError as err:
        say(log.error, "error: %s", err)
        # the trainer.devices workers' crash: their folder is kept, as a crash's is
        crashed = isinstance(err, WorkersFailed) and err.crashed
        if in_sweep:  # the sweep records this job as failed and runs the others
            if is_main() and not holds_a_record(hydra_folder):
                record_failure(hydra_folder, "failed", reason=str(err), message=str(err))
            raise
        exit_code = err.exit_code
    except SystemExit:
        raise
    except BaseException:
        crashed = True
        raise
    finally:
        if not crashed and is_main():
            discard_if_unused(hydra_folder)
    sys.exit(exit_code)


def say(write: Callable[..., None], message: str, err: BaseException) -> None:
    """One line from rank 0 (the others' log speaks only of trouble), unless the
    ``trainer.devices`` workers said it already."""
    if is_main() and not getattr(err, "told", False):
        write(message, err)


def is_main() -> bool:
    from stable_cnn.system.distributed import world_from_environment

    try:
        return world_from_environment().is_main
    except UserError:  # a launcher's environment we could not read: this process speaks
        return True


def workers_outcome(run_dir: Path, status: int, devices: int) -> float:
    """What the ``trainer.devices`` workers' run came to (their exit ``status`` and what
    they recorded in ``run_dir``): its best validation accuracy, or the exception its
    processes ended with, already told by them."""
    from stable_cnn.training.fit import RunPreempted, TrialPruned

    if status == 0 and (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())["best_val_acc"]
    failure = read_failure(run_dir) or {}
    ended: Exception
    if status == EXIT_PREEMPTED:
        ended = RunPreempted(failure.get("message", "stopped by a signal"))
    elif failure.get("status") == "pruned":
        ended = TrialPruned(failure["reason"])
    elif failure.get("status") == "diverged":
        ended = TrainingDiverged(failure["message"])
    else:  # a crash: the workers' traceback is above
        message = f"the {devices} training processes failed (exit {status}): see above"
        raise WorkersFailed(message, status or EXIT_FAILED)
    ended.told = True  # type: ignore[attr-defined]
    raise ended
