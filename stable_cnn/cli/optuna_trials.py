"""How one trial of ``hparams_search=optuna`` runs, and what it ended as: in Hydra's
launcher (one job per call, in this process with the basic launcher), or in a worker
process of its own (``hydra.sweeper.n_jobs`` > 1 on this machine), where each trial's
output lines carry its number and each worker gets its share of the cores or a GPU.

Either way the job is a stable-cnn-train run in ``<sweep dir>/<trial number>_<params>``,
and it reports each epoch to its trial (``hydra.sweeper.trial``), which may prune it.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from stable_cnn.cli.sweeps import DIVERGED_VALUE
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
    run_folder: str | None = None


def end_of_launched(job: Any) -> TrialEnd:
    """What a job run by Hydra's launcher returned (its own error where it failed)."""
    folder = str(job.hydra_cfg.hydra.runtime.output_dir) if job.hydra_cfg else None
    try:
        returned = job.return_value  # raises the job's own error where it failed
    except Exception as err:  # a failed job is a failed trial: the search goes on
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return TrialEnd(failure=reason, run_folder=folder)
    if isinstance(returned, Pruned):
        return TrialEnd(pruned=returned.reason, run_folder=folder)
    try:
        return TrialEnd(value=float(returned), run_folder=folder)
    except (TypeError, ValueError):
        return TrialEnd(failure=f"the job returned {returned!r}, not a number", run_folder=folder)


def end_of_folder(folder: Path | None, exit_code: int, output: list[str]) -> TrialEnd:
    """What a worker process's run ended as, read from its run folder (results.json,
    failure.json), else from its exit status and last error line."""
    import json

    where = None if folder is None else str(folder)
    if folder is not None and (folder / "results.json").is_file():
        value = json.loads((folder / "results.json").read_text()).get("best_val_acc")
        return TrialEnd(value=math.nan if value is None else float(value), run_folder=where)
    failure = None if folder is None else read_failure(folder)
    if failure is not None and failure["status"] == "pruned":
        return TrialEnd(pruned=failure["reason"], run_folder=where)
    if failure is not None and failure["status"] == "diverged":
        return TrialEnd(value=DIVERGED_VALUE, run_folder=where)
    if failure is not None:
        return TrialEnd(failure=failure["reason"], run_folder=where)
    errors = [line.split("error: ", 1)[1].strip() for line in output if "error: " in line]
    return TrialEnd(failure=errors[-1] if errors else f"exit status {exit_code}", run_folder=where)


def trial_folder(sweep_dir: Path, number: int) -> Path | None:
    """The run folder of trial ``number`` in ``sweep_dir`` (``7`` or ``7_optimizer.lr=...``)."""
    found = [p for p in sweep_dir.glob(f"{number}*") if p.name.split("_", 1)[0] == str(number)]
    return found[0] if found else None


class TrialWorkers:
    """Runs trials as worker processes of this machine: the same stable-cnn-train
    command a job of the search would be, in RUN mode, in the sweep's folder."""

    def __init__(self, config: DictConfig, n_jobs: int) -> None:
        from stable_cnn.system.hardware import usable_cores

        self.config = config
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self.threads = max(1, usable_cores() // n_jobs)
        self.gpus = visible_gpus()
        self.print_lock = threading.Lock()
        where = (
            f"{len(self.gpus)} GPU(s) shared in turn (CUDA_VISIBLE_DEVICES per worker)"
            if self.gpus
            else f"{self.threads} torch thread(s) each"
        )
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
            f"hydra.sweep.dir='{self.sweep_dir}'",
            "hydra.run.dir='${hydra.sweep.dir}/${hydra.sweep.subdir}'",
            *overrides,
        ]
        keys = {item.split("=", 1)[0].lstrip("+~") for item in overrides}
        if "trainer.num_threads" not in keys and not self.gpus:
            command.append(f"trainer.num_threads={self.threads}")
        if "trainer.progress_bar" not in keys:  # lines of several workers interleave
            command.append("trainer.progress_bar=false")
        return command

    def run(self, slot: int, number: int, overrides: list[str], study_name: str) -> TrialEnd:
        """Run trial ``number`` in worker ``slot``, its output lines marked with its number."""
        environment = dict(os.environ)
        if self.gpus:
            gpu = self.gpus[slot % len(self.gpus)]
            environment["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("trial %d runs on GPU %s", number, gpu)
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
            for line in worker.stdout:
                output.append(line)
                with self.print_lock:
                    print(f"[trial {number}] {line}", end="", flush=True)
        return end_of_folder(trial_folder(self.sweep_dir, number), worker.returncode, list(output))


def visible_gpus() -> list[str]:
    """The GPUs this machine lets the search use, as CUDA_VISIBLE_DEVICES names them."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [gpu for gpu in given.split(",") if gpu.strip() and gpu.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]
