"""The Hydra entrypoint, ``stable-cnn-train``: the only module that sees the DictConfig.

It composes the config, turns it into typed objects (range checks before any data is
read), hands them to training/fit.py (the run itself) and returns the best validation
accuracy to sweepers; every mistake a user can make ends here as one line and an exit
status.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from stable_cnn.cli.conf import config_dir
from stable_cnn.cli.extra_keys import typed, with_kwargs
from stable_cnn.cli.hydra_errors import run_reporting_hydra_errors
from stable_cnn.cli.run_folder import continue_log_in, output_folder_problem
from stable_cnn.cli.run_outcome import ended_command, workers_outcome
from stable_cnn.cli.sweeps import (
    NOT_HPARAMS,
    SWEEP_FOLDER,
    SWEPT_KEYS,
    register_job_folder_resolver,
    threads_per_parallel_job,
)
from stable_cnn.config import RunConfig, register_schemas
from stable_cnn.errors import EXIT_PREEMPTED, ConfigError
from stable_cnn.studies.optuna_study import Pruned
from stable_cnn.training.trackers import (
    RunLabels,
    as_text,
    check_stores,
    flat_params,
    run_labels,
)

if TYPE_CHECKING:
    from stable_cnn.studies.optuna_study import FollowerReport, TrialReport
    from stable_cnn.system.distributed import World
    from stable_cnn.training.tracking import Hparams

# What needs torch is imported where it is used, once Hydra has composed the config:
# --help, --cfg and a mistyped override answer in half a second instead of four.

log = logging.getLogger("stable_cnn")


def parse_run_config(cfg: DictConfig) -> RunConfig:
    """The composed config as typed objects; range checks run here, before any data."""
    try:
        groups = {
            name: with_kwargs(name, typed(name, cfg[name]), cfg[name])
            for name in RunConfig.__dataclass_fields__
            if name in cfg or name != "logger"  # (a config from before the group has none)
        }
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
    "optimizer.lr",
    "optimizer.weight_decay",
    "model.width",
    "model.dropout",
    "model.head_dropout",
    "clipping.max_norm",
    "data.batch_size",
    "trainer.epochs",
    "trainer.label_smoothing",
    "trainer.seed",
    "trainer.monitor",
)
HPARAM_GROUPS = ("data", "optimizer", "scheduler", "clipping", "amp", "ema", "experiment")


def hparams_of(cfg: DictConfig, choices: dict[str, Any], overrides: list[str]) -> Hparams:
    """This run's hyperparameters for TensorBoard: group choices and plain values, and
    which of them set it apart: a sweep's swept keys, else its own overrides."""
    from stable_cnn.training.tracking import Hparams

    values: dict[str, str | float | int | bool] = {
        group: str(choices.get(group)) for group in HPARAM_GROUPS
    }
    overridden = [
        key
        for key in (item.split("=", 1)[0].lstrip("+~") for item in overrides if "=" in item)
        if key not in NOT_HPARAMS
    ]
    for key in (*KEY_HPARAMS, *overridden):
        if key in choices:  # a group (experiment=smoke): its choice, not a config value
            values[key] = str(choices[key])
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, bool) or value is None:
            # TensorBoard shows a bool as 0/1; and every run needs every key, or the
            # HPARAMS tab (which takes its columns from one run) drops the column.
            values[key] = str(value).lower() if value is not None else "null"
        elif isinstance(value, int | float | str):
            values[key] = value
    swept = [key for key in os.environ.get(SWEPT_KEYS, "").split(",") if key]
    return Hparams(values, frozenset(swept or overridden) & frozenset(values))


register_schemas()
register_job_folder_resolver()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | Pruned:
    """Compose, train, and return best.pt's validation accuracy (what sweepers maximise),
    or, for a search's trial that its pruner stopped, how far it went; how the command
    ends otherwise is cli/run_outcome.py's."""
    hydra_config = HydraConfig.get()
    # a search's trial is a sweep's job, also in a worker process of its own (RUN mode)
    trial_number = OmegaConf.select(hydra_config, "sweeper.trial", default=None)
    in_sweep = hydra_config.mode == RunMode.MULTIRUN or trial_number is not None
    hydra_folder = Path(hydra_config.runtime.output_dir)
    return ended_command(
        lambda: run_training_command(cfg, hydra_folder, in_sweep), hydra_folder, in_sweep
    )


def run_training_command(cfg: DictConfig, hydra_folder: Path, in_sweep: bool) -> float | Pruned:
    from stable_cnn.system.distributed import check_devices, join, world_from_environment

    hydra_config = HydraConfig.get()
    world = world_from_environment()
    if not world.is_main:  # one process reports; the others speak only of trouble
        logging.getLogger("stable_cnn").setLevel(logging.WARNING)
    run = parse_run_config(cfg)
    debug = hydra_config.runtime.choices.get("debug")
    if problem := debug_preset_problem(debug, in_sweep, run.trainer.resume):
        raise ConfigError(problem)
    check_devices(world, run.trainer.devices)
    check_stores(run.logger)
    if run.optimizer.lr == "auto" and (run.trainer.devices > 1 or world.distributed):
        raise ConfigError(
            "optimizer.lr=auto finds the learning rate in one process: run "
            "stable-cnn-lr-find with the same overrides, then pass optimizer.lr=VALUE"
        )
    threads = threads_per_parallel_job(hydra_config.launcher)
    if in_sweep and threads is not None and run.trainer.num_threads is None:
        log.info("jobs run side by side: %d torch thread(s) each", threads)
        each = max(1, threads // run.trainer.devices)
        run = replace(run, trainer=replace(run.trainer, num_threads=each))
    run_dir = Path(hydra_config.runtime.output_dir)
    composed = OmegaConf.to_container(cfg, resolve=True)
    if run.trainer.devices > 1 and not world.distributed:
        return run_local_workers(run, run_dir, composed, hydra_config)
    join(world)
    run_dir = Path(world.broadcast(str(run_dir)))  # SLURM's tasks: rank 0's folder
    hparams = hparams_of(cfg, dict(hydra_config.runtime.choices), hydra_config.overrides.task)

    trial_number = OmegaConf.select(hydra_config, "sweeper.trial", default=None)
    trial = trial_of(hydra_config.sweeper, world) if trial_number is not None else None
    if trial is not None:  # the search reads the trial's outcome in its run folder
        trial.record_folder(run_dir)

    def elsewhere(folder: Path) -> None:
        continue_log_in(folder, hydra_folder, world)
        if trial is not None:
            trial.record_folder(folder)

    # a sweep's folder, also for a job's trainer.devices workers (which run as single runs)
    sweep_dir = os.environ.get(SWEEP_FOLDER) or (str(hydra_config.sweep.dir) if in_sweep else None)
    labels = labels_of(run_dir, composed, hparams, hydra_config.runtime.choices, sweep_dir)
    results = train_here(run, run_dir, composed, hparams, world, elsewhere, trial, labels)
    return results["best_val_acc"]


def labels_of(
    run_dir: Path,
    composed: dict[str, Any],
    hparams: Hparams,
    choices: DictConfig,
    sweep_dir: str | None,
) -> RunLabels:
    """How the logger group's stores name this run: the experiment preset, the keys that
    set it apart (hparams.varied) with their values, its sweep and the sweep's own run."""
    from stable_cnn.training.mlflow_tracker import SWEEP_RUN

    params = flat_params(composed)
    varied = {
        key: as_text(hparams.values.get(key, params.get(key))) for key in sorted(hparams.varied)
    }
    parents = {"mlflow": os.environ[SWEEP_RUN]} if os.environ.get(SWEEP_RUN) else {}
    experiment = choices.get("experiment")
    return run_labels(run_dir, composed, varied, experiment, sweep_dir, parents)


def train_here(
    run: RunConfig,
    run_dir: Path,
    composed: dict[str, Any],
    hparams: Hparams,
    world: World,
    on_run_folder: Callable[[Path], None],
    trial: TrialReport | FollowerReport | None,
    labels: RunLabels | None = None,
) -> dict[str, Any]:
    """This process's part of the run: the folder agreed on, then (optimizer.lr=auto)
    the range test, then the run built with what it found (``labels`` name it in the
    logger group's stores)."""
    from stable_cnn.training.auto_lr import with_auto_lr
    from stable_cnn.training.fit import started_run, train_started

    with started_run(run, run_dir, composed, Path("outputs"), world, on_run_folder) as start:
        if start.outcome is not None:  # trainer.resume found it finished
            return start.outcome
        data = None
        if start.run.optimizer.lr == "auto":  # the range test's data serves the run too
            start, data = with_auto_lr(start, composed, world)
            hparams.values["optimizer.lr"] = start.run.optimizer.lr
        return train_started(start, composed, hparams, world, trial, data, labels)


def debug_preset_problem(preset: str | None, in_sweep: bool, resume: str | None) -> str:
    """Why a debug preset (conf/debug/) makes no sense with these settings, or ''."""
    if preset is None:
        return ""
    if in_sweep:
        return f"debug={preset} is one quick run, not a sweep: drop -m (or debug={preset})"
    if resume is not None:
        return (
            f"debug={preset} starts a fresh run and keeps no checkpoint: drop trainer.resume "
            f"(or debug={preset})"
        )
    return ""


def preset_in_arguments(args: list[str]) -> str | None:
    """The debug preset a command line names (debug=NAME), if any."""
    named = [arg.split("=", 1)[1] for arg in args if arg.lstrip("+").startswith("debug=")]
    return named[-1] if named and named[-1] not in ("null", "") else None


def trial_of(sweeper: DictConfig, world: World) -> TrialReport | FollowerReport:
    """Where this job's epochs go: its trial of the search (``hydra.sweeper.trial``) on
    rank 0, which asks the study's pruner; the other processes follow rank 0."""
    from stable_cnn.cli.optuna_search import shown
    from stable_cnn.studies.optuna_study import (
        IN_MEMORY,
        FollowerReport,
        TrialReport,
        make_pruner,
    )

    if not world.is_main:
        return FollowerReport()
    storage, name = sweeper.get("storage"), sweeper.study_name
    if storage is None and name not in IN_MEMORY:
        log.warning(
            "trial %s's study is in the memory of another process: its epochs are not "
            "reported and it is not pruned (set hydra.sweeper.storage)",
            sweeper.trial,
        )
        return FollowerReport()
    pruner = make_pruner(sweeper.pruner, OmegaConf.to_container(sweeper.pruners))
    try:
        return TrialReport(storage, name, int(sweeper.trial), pruner)
    except (KeyError, ValueError, RuntimeError) as err:  # no such study or trial there
        raise ConfigError(
            f"hydra.sweeper.trial={sweeper.trial}: study {name} in {shown(storage)} has no such "
            f"trial ({' '.join(str(err).split())}); the search sets this key for its jobs"
        ) from None


# Hydra's own overrides that belong to the launching command, not to its workers (which
# run one job, in the folder they are given); a search's trial keeps its own.
LAUNCH_ONLY = (
    "hydra.run.",
    "hydra.sweep.",
    "hydra.mode",
    "hydra/launcher",
    "hydra.launcher",
    "hydra/sweeper",
    "hydra.sweeper",
    "hydra.job.num",
    "hydra.job.id",
)
TRIAL_KEYS = (
    "hydra/sweeper=",
    "hydra.sweeper.trial=",
    "hydra.sweeper.study_name=",
    "hydra.sweeper.storage=",
    "hydra.sweeper.pruner",
)


def worker_arguments(hydra_config: DictConfig, run_dir: Path, threads: int | None) -> list[str]:
    """The command line of a ``trainer.devices=N`` worker: this job's config (the same
    config name and folders, its overrides and Hydra's), in ``run_dir``."""
    arguments = []
    if hydra_config.job.config_name != "config":
        arguments += ["--config-name", hydra_config.job.config_name]
    for source in hydra_config.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            arguments += ["--config-dir", source.path]
    for item in hydra_config.overrides.hydra:
        if not item.startswith(LAUNCH_ONLY) or item.startswith(TRIAL_KEYS):
            arguments.append(item)
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
) -> float:
    """``trainer.devices=N``: the same command in N processes on this machine, writing to
    this run's folder (or the run it resumes); returns what rank 0 found, or raises how
    the workers' run ended (``workers_outcome``)."""
    from stable_cnn.state.resume import find_checkpoint
    from stable_cnn.system.distributed import launch_local_workers

    devices = run.trainer.devices
    resumed = find_checkpoint(
        run.trainer.resume, run_dir, Path("outputs"), composed_config, processes=devices
    )
    if resumed is not None and resumed.parent.name == "checkpoints":
        continue_log_in(resumed.parent.parent, run_dir)
        run_dir = resumed.parent.parent  # the workers continue it there
    log.info(
        "starting %d training processes on this machine (trainer.devices=%d)", devices, devices
    )
    arguments = worker_arguments(hydra_config, run_dir, run.trainer.num_threads)
    status = launch_local_workers(devices, arguments, EXIT_PREEMPTED)
    return workers_outcome(run_dir, status, devices)


def cli() -> None:
    """The console entry point: pre-flight checks with one-line errors, then ``main``."""
    args = sys.argv[1:]
    multirun = "-m" in args or "--multirun" in args
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("trainer.resume=")), None)
    # refused here, before a sweep starts jobs that would each refuse it
    problem = debug_preset_problem(
        preset_in_arguments(args), multirun, None if resume == "null" else resume
    )
    problem = problem or output_folder_problem(args)
    if problem:
        print(f"stable-cnn-train: error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        run_reporting_hydra_errors(main, "stable-cnn-train")
    except SystemExit as exiting:
        end_of_distributed_process(exiting.code)
        raise
    end_of_distributed_process(0)


def end_of_distributed_process(code: object) -> None:
    """A process of a distributed run (torchrun, trainer.devices) exits with ``code``
    without the interpreter's teardown, where gloo may abort it (system/distributed.py)."""
    if "torch.distributed" in sys.modules:  # only then can this process be in a group
        from stable_cnn.system.distributed import exit_process_of_group

        exit_process_of_group(code)


if __name__ == "__main__":
    # Run the copy imported as stable_cnn.cli.train, not this __main__ one: launchers that
    # pickle the task function (joblib, submitit) find it by its module's name.
    from stable_cnn.cli.train import cli as package_cli

    package_cli()
