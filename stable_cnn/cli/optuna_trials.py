"""How the trials of ``hparams_search=optuna`` run, and what each ended as: in Hydra's
launcher (one job per call, in this process with the basic launcher), or in a worker
process of its own (``hydra.sweeper.n_jobs`` > 1 on this machine), where each trial's
output lines carry its number and each worker gets its share of the cores or a GPU.

Either way the job is a stable-cnn-train run in ``<sweep dir>/<trial number>_<params>``,
and it reports each epoch to its trial (``hydra.sweeper.trial``), which may prune it.
Several run side by side (TrialPlan, run_side_by_side) without waiting for each other,
and each one's end is told to the study (tell).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from stable_cnn.cli.hydra_errors import FULL_ERROR_SET_HERE
from stable_cnn.cli.sweeps import DIVERGED_VALUE
from stable_cnn.errors import EXIT_PREEMPTED
from stable_cnn.state.run_files import read_failure
from stable_cnn.studies.optuna_study import Pruned

log = logging.getLogger("stable_cnn")

# Hydra's own overrides of the search command that its trials do not take: how the
# search runs (its launcher, its folders, its size) and its space (a trial gets values).
NOT_FOR_TRIALS = (
    "hydra.run.",
    "hydra.sweep.",
    "hydra.mode",
    "hydra/launcher",
    "hydra.launcher",
    "hydra.job.num",
    "hydra.job.id",
    "hydra.sweeper.params",
    "hydra.sweeper.n_",
    "hydra.sweeper.study_name",
    "hydra.sweeper.trial",
)
OUTPUT_LINES_KEPT = 40  # of a worker's output, to say why it failed


@dataclass
class TrialEnd:
    """How a trial's job ended: a value, pruned, or failed (and why)."""

    value: float | None = None
    pruned: str = ""  # e.g. "after epoch 2 (val_acc 41.20%)"
    failure: str = ""


def end_of_launched(job: Any) -> TrialEnd:
    """What a job run by Hydra's launcher returned (its own error where it failed)."""
    try:
        returned = job.return_value  # raises the job's own error where it failed
    except Exception as err:  # a failed job is a failed trial: the search goes on
        return TrialEnd(failure=str(err).splitlines()[0] if str(err) else type(err).__name__)
    if isinstance(returned, Pruned):
        return TrialEnd(pruned=returned.reason)
    try:
        return TrialEnd(value=float(returned))
    except (TypeError, ValueError):
        return TrialEnd(failure=f"the job returned {returned!r}, not a number")


def end_of_worker(recorded_folder: str | None, exit_code: int, output: list[str]) -> TrialEnd:
    """What a worker process's run ended as, read from the run folder its job recorded
    on the trial (results.json, failure.json), else from its exit status and last error
    line (a job refused before it had a run)."""
    folder = None if recorded_folder is None else Path(recorded_folder)
    if folder is not None and (folder / "results.json").is_file():
        value = json.loads((folder / "results.json").read_text()).get("best_val_acc")
        return TrialEnd(value=math.nan if value is None else float(value))
    failure = None if folder is None else read_failure(folder)
    if failure is not None and failure["status"] == "pruned":
        return TrialEnd(pruned=failure["reason"])
    if failure is not None and failure["status"] == "diverged":
        return TrialEnd(value=DIVERGED_VALUE)
    if failure is not None:
        return TrialEnd(failure=failure["reason"])
    errors = [line.split("error: ", 1)[1].strip() for line in output if "error: " in line]
    reason = errors[-1] if errors else f"exit status {exit_code}"
    return TrialEnd(failure=reason)


PLAIN_WORD = re.compile(r"[A-Za-z_][\w.\-/]*")


def hydra_value(value: Any) -> str:
    """A value as a Hydra override writes it: strings quoted where a plain word would
    read as something else (a number, a list, a sweep: "001", "a,b", "x y")."""
    if isinstance(value, str):
        if PLAIN_WORD.fullmatch(value) and value.lower() not in ("null", "true", "false"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


class TrialWorkers:
    """Runs trials as worker processes of this machine: the same stable-cnn-train
    command a job of the search would be, in RUN mode, in the sweep's folder."""

    def __init__(self, config: DictConfig, n_jobs: int, devices: int) -> None:
        from stable_cnn.system.hardware import usable_cores

        self.config = config
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.devices = devices  # trainer.devices: processes (and GPUs) of each trial
        self.threads = max(1, usable_cores() // (n_jobs * devices))
        self.gpus = visible_gpus()
        self.print_lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        if self.gpus:
            where = f"{devices} of {len(self.gpus)} GPU(s) each (CUDA_VISIBLE_DEVICES, in turn)"
        else:
            where = f"{self.threads} torch thread(s) per process"
        log.info("%d worker processes run trials side by side: %s", n_jobs, where)

    def command(self, number: int, overrides: list[str], study_name: str) -> list[str]:

        hydra = self.config.hydra
        command = [sys.executable, "-m", "stable_cnn.cli.train"]
        if hydra.job.config_name != "config":
            command += ["--config-name", hydra.job.config_name]
        for source in hydra.runtime.config_sources:
            if source.provider == "command-line" and source.schema == "file":
                command += ["--config-dir", source.path]
        command += [item for item in hydra.overrides.hydra if not item.startswith(NOT_FOR_TRIALS)]
        command += [
            f"hydra.sweeper.study_name={study_name}",
            f"hydra.sweeper.trial={number}",
            f"hydra.job.num={number}",  # the folder's number, as a job of the launcher's
            f"hydra.sweep.dir={hydra_value(str(self.sweep_dir))}",
            "hydra.run.dir='${hydra.sweep.dir}/${hydra.sweep.subdir}'",
            *overrides,
        ]
        keys = {item.split("=", 1)[0].lstrip("+~") for item in overrides}
        if "trainer.num_threads" not in keys and not self.gpus:
            command.append(f"trainer.num_threads={self.threads}")
        if "trainer.progress_bar" not in keys:  # lines of several workers interleave
            command.append("trainer.progress_bar=false")
        return command

    def run(
        self, slot: int, number: int, overrides: list[str], study_name: str
    ) -> tuple[int, list[str]]:
        """Run trial ``number`` in worker ``slot``, its output lines marked with its
        number; returns its exit status and its last lines."""
        environment = dict(os.environ)
        if FULL_ERROR_SET_HERE in environment:  # a worker's errors are one line, as ours
            environment.pop("HYDRA_FULL_ERROR", None)
        if self.gpus:
            first = slot * self.devices
            mine = [self.gpus[(first + k) % len(self.gpus)] for k in range(self.devices)]
            environment["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
            log.info("trial %d runs on GPU(s) %s", number, ",".join(mine))
        command = self.command(number, overrides, study_name)
        log.info("\t#%d : %s", number, " ".join(overrides))  # as Hydra's launchers list jobs
        output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
            errors="replace",
        ) as worker:
            self.running.add(worker)
            for line in worker.stdout:
                output.append(line)
                with self.print_lock:
                    print(f"[trial {number}] {line}", end="", flush=True)
        self.running.discard(worker)
        return worker.returncode, list(output)

    def signal_all(self, signum: int) -> None:
        """Pass a signal on to the running workers (each saves its trial's checkpoint)."""
        for worker in list(self.running):
            if worker.poll() is None:
                worker.send_signal(signum)


def visible_gpus() -> list[str]:
    """The GPUs this machine lets the search use, as CUDA_VISIBLE_DEVICES names them."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [gpu for gpu in given.split(",") if gpu.strip() and gpu.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


class TrialPlan:
    """What the workers of one invocation share: the trials left to ask for, how many
    ended and failed, and whether to stop (too many failures, or an error)."""

    def __init__(self, trials: int, max_failure_rate: float) -> None:
        self.left, self.max_failure_rate = trials, max_failure_rate
        self.ended = self.failed = 0
        self.stopped = self.too_many_failed = False
        self.lock = threading.Lock()

    def next(self, ask: Callable[[], Any]) -> Any:
        """A new trial (asked under the lock: one at a time), or None when done."""
        with self.lock:
            if self.stopped or self.left == 0:
                return None
            self.left -= 1
            return ask()

    def ended_as(self, state: str) -> None:
        with self.lock:
            self.ended += 1
            self.failed += state == "failed"
            if self.failed / self.ended > self.max_failure_rate:
                self.stopped = self.too_many_failed = True

    def stop(self) -> None:
        with self.lock:
            self.stopped = True


def run_side_by_side(
    slots: int,
    run_slot: Callable[[int], None],
    plan: TrialPlan,
    pass_on: Callable[[int], None] | None,
) -> None:
    """``run_slot`` in ``slots`` threads; the first error stops the others from asking
    for more trials and is raised once every thread has ended. Ctrl-C or SIGTERM (passed
    on to the workers with ``pass_on``) lets the running trials save, then exits 75."""
    errors: list[BaseException] = []
    ended = [threading.Event() for _ in range(slots)]

    def guarded(slot: int) -> None:
        try:
            run_slot(slot)
        except BaseException as err:
            errors.append(err)
            plan.stop()
        finally:
            ended[slot].set()

    def interrupt(signum: int, frame: object) -> None:
        if pass_on is not None:
            pass_on(signum)
        raise KeyboardInterrupt

    for slot in range(slots):  # daemons: a second Ctrl-C ends the search at once
        threading.Thread(target=guarded, args=(slot,), name=f"trials-{slot}", daemon=True).start()
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:  # Events, not Thread.join: a join that Ctrl-C interrupts may stop waiting for good
        for event in ended:
            event.wait()
    except KeyboardInterrupt:  # the workers got it too (or from us): they save and stop
        plan.stop()
        for event in ended:
            event.wait()
        log.warning("stopped by a signal: the running trials saved their checkpoints")
        sys.exit(EXIT_PREEMPTED)  # as a single run's job stops the sweep
    finally:
        signal.signal(signal.SIGTERM, previous)
    if errors:
        raise errors[0]


def tell(study: Any, trial: Any, end: TrialEnd) -> str:
    """Tell ``study`` how ``trial``'s job ended; returns complete, pruned or failed."""
    import optuna

    if end.pruned:
        log.info("trial %d pruned %s", trial.number, end.pruned)
        told(study, trial, state=optuna.trial.TrialState.PRUNED)
        return "pruned"
    if end.failure:  # a failed job is a failed trial: the search goes on
        log.warning("trial %d failed: %s", trial.number, end.failure)
        told(study, trial, state=optuna.trial.TrialState.FAIL)
        return "failed"
    now = told(study, trial, end.value)
    if now is not None and now.state.name == "FAIL" and math.isfinite(end.value):
        log.warning(
            "trial %d had been marked failed meanwhile (by another search that "
            "found no heartbeat): its value %s is lost",
            trial.number,
            end.value,
        )
        return "failed"
    return "complete" if math.isfinite(end.value) else "failed"


def told(study: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
    """``study.tell``: the trial as the study has it now (as it was, where it had been
    ended already), or None where the grid sampler stopped at its last point."""
    try:
        return study.tell(trial, *args, skip_if_finished=True, **kwargs)
    except RuntimeError as err:  # Study.stop() outside optimize(): the grid is done
        if "Study.stop" not in str(err):
            raise
        return None
