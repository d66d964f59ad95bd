"""The Hydra entrypoint, ``stable-cnn-train``: the only module that sees the DictConfig.

It composes the config, turns it into typed objects (range checks before any data is
read), hands them to ``loop.train`` (the run itself) and returns the best validation
accuracy to sweepers; every mistake a user can make ends here as one line and an exit
status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from stable_cnn.cli.hydra_errors import run_reporting_hydra_errors
from stable_cnn.config import RunConfig, register_schemas
from stable_cnn.errors import ConfigError, TrainingDiverged, UserError
from stable_cnn.state.resume import find_checkpoint
from stable_cnn.state.run_files import holds_a_record, read_failure, record_failure
from stable_cnn.studies.report import short_override, write_report
from stable_cnn.system.distributed import (
    ALONE,
    World,
    check_devices,
    join,
    launch_local_workers,
    world_from_environment,
)
from stable_cnn.system.hardware import usable_cores
from stable_cnn.system.signals import EXIT_PREEMPTED
from stable_cnn.training.fit import RunPreempted, train
from stable_cnn.training.tracking import Hparams

log = logging.getLogger("stable_cnn")


def config_dir() -> str:
    """conf/ at the repository root (source checkout, editable install), else the copy
    shipped inside the package (``pip install .``)."""
    package = Path(__file__).resolve().parents[1]  # stable_cnn/
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no conf/config.yaml next to {package}: reinstall stable-cnn")


def parse_run_config(cfg: DictConfig) -> RunConfig:
    """The composed config as typed objects; range checks run here, before any data."""
    try:
        groups = {name: OmegaConf.to_object(cfg[name]) for name in RunConfig.__dataclass_fields__}
    except MissingMandatoryValue as err:  # a key left as ??? in the YAML
        raise ConfigError(
            f"{err.full_key} is required here and has no value: add {err.full_key}=... "
            f"to the command line"
        ) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    return RunConfig(**groups)


# Always in the HPARAMS tab (with the config groups' choices and every overridden key),
# so that runs of a sweep line up in the same columns.
KEY_HPARAMS = (
    "optimizer.lr", "optimizer.weight_decay", "model.width", "model.dropout",
    "model.head_dropout", "clipping.max_norm", "data.batch_size", "trainer.epochs",
    "trainer.label_smoothing", "trainer.seed",
)  # fmt: skip
HPARAM_GROUPS = ("data", "optimizer", "scheduler", "clipping", "amp", "ema", "experiment")
# What a diverged job returns to a sweeper: the worst accuracy there is, so that the sweep
# goes on and Optuna's sampler learns to avoid that region (a failed trial teaches it nothing).
DIVERGED_VALUE = 0.0


# Overrides that change nothing a run computes: never a reason to compare runs by them.
NOT_HPARAMS = ("trainer.resume", "trainer.progress_bar", "trainer.num_threads", "hparams_search")
SWEPT_KEYS = "STABLE_CNN_SWEPT_KEYS"  # set by SweepCallback for the sweep's jobs


def hparams_of(cfg: DictConfig, choices: dict[str, Any], overrides: list[str]) -> Hparams:
    """This run's hyperparameters for TensorBoard: group choices and plain values, and
    which of them set it apart: a sweep's swept keys, else its own overrides."""
    values: dict[str, str | float | int | bool] = {
        group: str(choices.get(group)) for group in HPARAM_GROUPS
    }
    overridden = [key for key in (item.split("=", 1)[0].lstrip("+~") for item in overrides
                                  if "=" in item) if key not in NOT_HPARAMS]  # fmt: skip
    for key in (*KEY_HPARAMS, *overridden):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, bool) or value is None:
            # TensorBoard shows a bool as 0/1; and every run needs every key, or the
            # HPARAMS tab (which takes its columns from one run) drops the column.
            values[key] = str(value).lower() if value is not None else "null"
        elif isinstance(value, int | float | str):
            values[key] = value
    swept = [key for key in os.environ.get(SWEPT_KEYS, "").split(",") if key]
    return Hparams(values, frozenset(swept or overridden) & frozenset(values))


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun sweeps: command-line sweeps (``a=1,2``, ``choice(...)``,
    ``interval(...)``) and the sweeper's own search space (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [override.key_or_group for override in parsed if override.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    return sorted({*keys, *params.keys()} - set(NOT_HPARAMS))


def threads_per_parallel_job(launcher: DictConfig) -> int | None:
    """Torch threads for each job when the launcher runs jobs side by side (joblib), so
    that together they use each core once; None when jobs run one at a time."""
    n_jobs = launcher.get("n_jobs")
    if "joblib" not in str(launcher.get("_target_", "")) or not isinstance(n_jobs, int):
        return None
    cores = usable_cores()
    side_by_side = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's -1 = all
    return max(1, cores // side_by_side)


class SweepCallback(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): creates the sweep folder before
    the first job (an Optuna study file is opened there first) and writes the sweep
    report (as ``stable-cnn-report <report_root>`` would) when the sweep ends.
    ``report_root`` defaults to the sweep folder."""

    def __init__(self, report_root: str | None = None) -> None:
        self.report_root = report_root

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for folder in (config.hydra.sweep.dir, self.report_root):
            if folder:
                Path(folder).mkdir(parents=True, exist_ok=True)
        # The jobs' HPARAMS records mark these as the keys that set runs apart (an
        # environment variable reaches jobs in this process, joblib's and SLURM's alike).
        os.environ[SWEPT_KEYS] = ",".join(swept_keys(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEPT_KEYS, None)
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
            # every job was refused, or went on in the run it resumed: nothing to report
            log.info("no run of this sweep is in %s: removed it", sweep_dir)
            discard_if_unused(sweep_dir)
            return
        root = Path(self.report_root or config.hydra.sweep.dir).resolve()
        try:
            written = write_report(root, root)
        except Exception as err:  # a report must never turn a finished sweep into a failure
            log.warning("no sweep report (%s); try stable-cnn-report %s", err, root)
            return
        log.info("sweep report: %s", ", ".join(str(path) for path in written))


class SharedRunFolder(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): the processes that torchrun
    starts each compose the config, and each would resolve ``${now:...}`` in its own
    second. Before Hydra creates the run folder, they join the process group and take
    rank 0's folder, so that one run has one folder (with or without hydra.run.dir)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        world = world_from_environment()
        if world.distributed:
            join(world)
            agreed = world.broadcast(str(config.hydra.run.dir))
            with open_dict(config):
                config.hydra.run.dir = agreed
                if not world.is_main:  # rank 0 writes .hydra/ (the same config)
                    config.hydra.output_subdir = None


JOB_FOLDER_LENGTH = 160  # characters of a sweep job's folder name, at most (filesystems: 255)


def job_folder(number: int, overrides: str) -> str:
    """A sweep job's folder: its number and the overrides that set it apart (of
    ``hydra.job.override_dirname``, the swept ones), made filesystem-safe (a path's
    ``/`` would nest folders) and cut to a readable length, with a hash of the rest so
    that names stay unique: ``3_optimizer.lr=0.1``."""
    swept = {key for key in os.environ.get(SWEPT_KEYS, "").split(",") if key}
    items = re.split(r",(?=[\w.+~@/-]+=)", overrides) if overrides else []
    if swept:
        items = [item for item in items if item.split("=", 1)[0].lstrip("+~") in swept]
    overrides = ",".join(short_override(item) for item in items)
    if not overrides:
        return str(number)
    safe = re.sub(r"[^A-Za-z0-9._=,+@-]", "_", overrides)
    name = f"{number}_{safe}"
    if len(name) > JOB_FOLDER_LENGTH:
        digest = hashlib.sha1(overrides.encode()).hexdigest()[:8]
        name = f"{name[: JOB_FOLDER_LENGTH - 9]}~{digest}"
    return name


register_schemas()
OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Compose, train, and return the best validation accuracy (what sweepers maximise).
    A command that ends without a run of its own in the folder Hydra made for it (it was
    refused, continued a run elsewhere, or found it finished) removes that folder."""
    hydra_folder = Path(HydraConfig.get().runtime.output_dir)
    expected = True  # False for a crash: its folder keeps train.log and the traceback
    try:
        return run_training_command(cfg, hydra_folder)
    except SystemExit:
        raise
    except UserError as err:  # a sweep's job (a single command exits above): its report says why
        if world_from_environment().is_main and not holds_a_record(hydra_folder):
            record_failure(hydra_folder, "failed", reason=str(err), message=str(err))
        raise
    except BaseException:
        expected = False
        raise
    finally:
        if expected and world_from_environment().is_main:
            discard_if_unused(hydra_folder)


def discard_if_unused(folder: Path) -> None:
    """Remove ``folder`` (Hydra's .hydra/ and train.log) when it holds no run, and the
    empty folders above it up to the current one (outputs/<date>/ of a refused run)."""
    if holds_a_record(folder) or not folder.is_dir():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(
            folder.resolve()
        ):
            handler.close()  # its file is about to go
    shutil.rmtree(folder, ignore_errors=True)
    here = Path.cwd().resolve()
    parent = folder.resolve().parent
    while parent != here and parent.is_relative_to(here) and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def continue_log_in(run_dir: Path, hydra_folder: Path, world: World = ALONE) -> None:
    """The command goes on in another run's folder (a resume): its log moves there,
    after what it logged so far, and goes on in that run's train.log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler):
            continue
        old = Path(handler.baseFilename)
        if not old.is_relative_to(hydra_folder.resolve()):
            continue
        handler.flush()
        new = run_dir / old.name
        if world.is_main and old.is_file():
            with new.open("a") as log_file:
                log_file.write(old.read_text())
        replacement = logging.FileHandler(new, mode="a")
        replacement.setFormatter(handler.formatter)
        replacement.setLevel(handler.level)
        root.addHandler(replacement)
        root.removeHandler(handler)
        handler.close()


def run_training_command(cfg: DictConfig, hydra_folder: Path) -> float:
    hydra_config = HydraConfig.get()
    in_sweep = hydra_config.mode == RunMode.MULTIRUN
    world = ALONE
    try:
        world = world_from_environment()
        if not world.is_main:  # one process reports; the others speak only of trouble
            logging.getLogger("stable_cnn").setLevel(logging.WARNING)
        run = parse_run_config(cfg)
        check_devices(world, run.trainer.devices)
        threads = threads_per_parallel_job(hydra_config.launcher)
        if in_sweep and threads is not None and run.trainer.num_threads is None:
            log.info("jobs run side by side: %d torch thread(s) each", threads)
            each = max(1, threads // run.trainer.devices)
            run = replace(run, trainer=replace(run.trainer, num_threads=each))
        run_dir = Path(hydra_config.runtime.output_dir)
        composed = OmegaConf.to_container(cfg, resolve=True)
        if run.trainer.devices > 1 and not world.distributed:
            return run_local_workers(run, run_dir, composed, hydra_config, in_sweep)
        join(world)
        run_dir = Path(world.broadcast(str(run_dir)))  # SLURM's tasks: rank 0's folder
        hparams = hparams_of(cfg, dict(hydra_config.runtime.choices), hydra_config.overrides.task)

        def elsewhere(folder: Path) -> None:
            continue_log_in(folder, hydra_folder, world)

        results = train(run, run_dir, composed, hparams=hparams, world=world,
                        on_run_folder=elsewhere)  # fmt: skip
    except TrainingDiverged as err:
        if world.is_main:
            log.error("error: %s", err)
        if in_sweep:
            log.info("returning %s to the sweeper for this diverged job", DIVERGED_VALUE)
            return DIVERGED_VALUE
        sys.exit(err.exit_code)
    except UserError as err:
        if world.is_main:
            log.error("error: %s", err)
        if in_sweep:
            raise  # the sweep records this job as failed and runs the others
        sys.exit(err.exit_code)
    except RunPreempted as stopped:
        if world.is_main:
            log.warning("%s", stopped)
        # SystemExit, not the exception: Hydra would record a failed job and start the next
        # one, but a signal (Ctrl-C, SLURM preemption) is meant for the whole sweep.
        sys.exit(EXIT_PREEMPTED)
    return results["best_val_acc"]


# Hydra's own overrides that belong to the launching command, not to its workers (which
# run one job, in the folder they are given).
LAUNCH_ONLY = ("hydra.run.", "hydra.sweep.", "hydra.mode", "hydra/launcher", "hydra.launcher",
               "hydra/sweeper", "hydra.sweeper", "hydra.job.num", "hydra.job.id")  # fmt: skip


def worker_arguments(hydra_config: DictConfig, run_dir: Path, threads: int | None) -> list[str]:
    """The command line of a ``trainer.devices=N`` worker: this job's config (the same
    config name and folders, its overrides and Hydra's), in ``run_dir``."""
    arguments = []
    if hydra_config.job.config_name != "config":
        arguments += ["--config-name", hydra_config.job.config_name]
    for source in hydra_config.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            arguments += ["--config-dir", source.path]
    arguments += [item for item in hydra_config.overrides.hydra if not item.startswith(LAUNCH_ONLY)]
    task = list(hydra_config.overrides.task)
    arguments += [*task, f"hydra.run.dir='{run_dir}'"]
    if threads is not None and not any(item.startswith("trainer.num_threads=") for item in task):
        arguments.append(f"trainer.num_threads={threads}")  # a joblib sweep's share
    return arguments


def run_local_workers(
    run: RunConfig,
    run_dir: Path,
    composed_config: dict[str, Any],
    hydra_config: DictConfig,
    in_sweep: bool,
) -> float:
    """``trainer.devices=N``: the same command in N processes on this machine, writing to
    this run's folder (or the run it resumes); returns what rank 0 found. A failed run
    exits with the workers' status (in a sweep: fails this job alone), a preempted one
    with 75 (the whole sweep), a diverged one in a sweep returns the worst value."""
    devices = run.trainer.devices
    resumed = find_checkpoint(
        run.trainer.resume, run_dir, Path("outputs"), composed_config, processes=devices
    )
    if resumed is not None and resumed.parent.name == "checkpoints":
        continue_log_in(resumed.parent.parent, run_dir)
        run_dir = resumed.parent.parent  # the workers continue it there
    log.info("starting %d training processes on this machine (trainer.devices=%d)", devices,
             devices)  # fmt: skip
    arguments = worker_arguments(hydra_config, run_dir, run.trainer.num_threads)
    status = launch_local_workers(devices, arguments, EXIT_PREEMPTED)
    if status == 0:
        return json.loads((run_dir / "results.json").read_text())["best_val_acc"]
    failure = read_failure(run_dir)
    if in_sweep and failure is not None and failure["status"] == "diverged":
        log.info("returning %s to the sweeper for this diverged job", DIVERGED_VALUE)
        return DIVERGED_VALUE
    if in_sweep and status != EXIT_PREEMPTED:
        raise UserError(f"the {devices} training processes failed (exit {status}): see above")
    sys.exit(status)


def output_folder_problem(args: list[str]) -> str:
    """Why the run folder cannot be created, or ''. Hydra creates it before ``main`` runs
    and would answer with a traceback, so the console entry checks first."""
    folders = [arg.split("=", 1)[1] for arg in args
               if arg.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]  # fmt: skip
    for folder in folders or ["outputs"]:
        existing = Path(folder).expanduser().absolute()
        while not existing.exists():
            existing = existing.parent
        why = "is a file" if not existing.is_dir() else ""
        why = why or ("is not writable" if not os.access(existing, os.W_OK) else "")
        if why:
            return f"cannot create the run folder {folder}: {existing} {why}; set hydra.run.dir"
    return ""


def cli() -> None:
    """The console entry point: pre-flight checks with one-line errors, then ``main``."""
    problem = output_folder_problem(sys.argv[1:])
    if problem:
        print(f"stable-cnn-train: error: {problem}", file=sys.stderr)
        sys.exit(2)
    run_reporting_hydra_errors(main, "stable-cnn-train")


if __name__ == "__main__":
    # Run the copy imported as stable_cnn.cli.train, not this __main__ one: launchers that
    # pickle the task function (joblib, submitit) find it by its module's name.
    from stable_cnn.cli.train import cli as package_cli

    package_cli()
