"""Hydra multirun support for stable-cnn-train: the sweep callback (the sweep's folder,
the keys it sweeps, its report), the names of the jobs' folders, and the torch threads
of jobs that run side by side."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stable_cnn.cli.run_folder import discard_if_unused
from stable_cnn.config.logger import LoggerConfig
from stable_cnn.studies.report import short_override, write_report

log = logging.getLogger("stable_cnn")

# Overrides that change nothing a run computes: never a reason to compare runs by them.
NOT_HPARAMS = ("trainer.resume", "trainer.progress_bar", "trainer.num_threads", "hparams_search")
SWEPT_KEYS = "STABLE_CNN_SWEPT_KEYS"  # set by SweepCallback for the sweep's jobs
SWEEP_FOLDER = "STABLE_CNN_SWEEP_DIR"  # the sweep's folder, for its jobs' experiment stores
# What a diverged job returns to a sweeper: the worst accuracy there is, so that the sweep
# goes on and Optuna's sampler learns to avoid that region (a failed trial teaches it nothing).
DIVERGED_VALUE = 0.0


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun sweeps: command-line sweeps (``a=1,2``, ``choice(...)``,
    ``interval(...)``) and the sweeper's own search space (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [override.key_or_group for override in parsed if override.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    named = {key.lstrip("+~") for key in (*keys, *params.keys())}  # +model.width: model.width
    return sorted(named - set(NOT_HPARAMS))


def threads_per_parallel_job(launcher: DictConfig) -> int | None:
    """Torch threads for each job when the launcher runs jobs side by side (joblib), so
    that together they use each core once; None when jobs run one at a time."""
    n_jobs = launcher.get("n_jobs")
    if "joblib" not in str(launcher.get("_target_", "")) or not isinstance(n_jobs, int):
        return None
    from stable_cnn.system.hardware import usable_cores  # torch: only where jobs run side by side

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
        os.environ[SWEEP_FOLDER] = str(config.hydra.sweep.dir)
        logger = sweep_logger(config)
        if logger is not None and logger.mlflow:  # the jobs' parent run, opened once
            self.open_parent_run(logger, config)

    def open_parent_run(self, logger: LoggerConfig, config: DictConfig) -> None:
        """MLflow: the sweep's own run, whose children the jobs' runs are; it ends with
        the sweep, or as KILLED when the sweep stops before its end (a failed job, a
        signal: Hydra then skips on_multirun_end)."""
        from stable_cnn.training.mlflow_tracker import SWEEP_RUN, end_sweep_run, start_sweep_run

        experiment = config.hydra.runtime.choices.get("experiment") or "stable-cnn"
        try:
            run_id = start_sweep_run(logger, experiment, str(config.hydra.sweep.dir))
        except Exception as err:  # Hydra would make it a warning among the jobs' output
            log.error("MLflow: no run for this sweep (%s); its jobs' runs have no parent", err)
            return
        os.environ[SWEEP_RUN] = run_id
        atexit.register(end_sweep_run, logger, run_id, "KILLED")  # does nothing once ended
        log.info("MLflow: this sweep's jobs are child runs of run %s", run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEPT_KEYS, None)
        os.environ.pop(SWEEP_FOLDER, None)
        try:
            self.write_sweep_report(config)
        finally:
            self.end_parent_run(config)

    def end_parent_run(self, config: DictConfig) -> None:
        from stable_cnn.training.mlflow_tracker import SWEEP_RUN, end_sweep_run

        if (run_id := os.environ.pop(SWEEP_RUN, None)) and (logger := sweep_logger(config)):
            try:
                end_sweep_run(logger, run_id, "FINISHED")
            except Exception as err:
                log.warning("MLflow: this sweep's run %s did not end (%s)", run_id, err)

    def write_sweep_report(self, config: DictConfig) -> None:
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


def sweep_logger(config: DictConfig) -> LoggerConfig | None:
    """The sweep's logger group as typed settings (None in a config without it); a store
    whose package is missing is refused (Hydra makes that a warning: each job then
    refuses it in one line)."""
    from stable_cnn.training.trackers import check_stores

    if "logger" not in config:
        return None
    logger = LoggerConfig(**OmegaConf.to_container(config.logger, resolve=True))
    check_stores(logger)
    return logger


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


def register_job_folder_resolver() -> None:
    """``${job_folder:...}`` in conf/config.yaml's hydra.sweep.subdir."""
    OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)
