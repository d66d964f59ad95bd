"""The Hydra entrypoint, ``stable-cnn-train``: the only module that sees the DictConfig.

It composes the config, turns it into typed objects (range checks before any data is
read), hands them to ``loop.train`` (the run itself) and returns the best validation
accuracy to sweepers; every mistake a user can make ends here as one line and an exit
status.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from stable_cnn.config import RunConfig, register_schemas
from stable_cnn.engine import TrainingDiverged
from stable_cnn.errors import ConfigError, UserError
from stable_cnn.hardware import usable_cores
from stable_cnn.loop import RunPreempted, train
from stable_cnn.preemption import EXIT_PREEMPTED
from stable_cnn.report import write_report
from stable_cnn.tracking import Hparams

log = logging.getLogger("stable_cnn")


def config_dir() -> str:
    """conf/ at the repository root (source checkout, editable install), else the copy
    shipped inside the package (``pip install .``)."""
    package = Path(__file__).resolve().parent
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


def hparams_of(cfg: DictConfig, choices: dict[str, Any], overrides: list[str]) -> Hparams:
    """This run's hyperparameters for TensorBoard: group choices and plain values."""
    hparams: Hparams = {group: str(choices.get(group)) for group in HPARAM_GROUPS}
    overridden = [item.split("=", 1)[0].lstrip("+~") for item in overrides if "=" in item]
    for key in (*KEY_HPARAMS, *overridden):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, bool) or value is None:
            # TensorBoard shows a bool as 0/1; and every run needs every key, or the
            # HPARAMS tab (which takes its columns from one run) drops the column.
            hparams[key] = str(value).lower() if value is not None else "null"
        elif isinstance(value, int | float | str):
            hparams[key] = value
    return hparams


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

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(self.report_root or config.hydra.sweep.dir).resolve()
        try:
            written = write_report(root, root)
        except Exception as err:  # a report must never turn a finished sweep into a failure
            log.warning("no sweep report (%s); try stable-cnn-report %s", err, root)
            return
        log.info("sweep report: %s", ", ".join(str(path) for path in written))


register_schemas()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Compose, train, and return the best validation accuracy (what sweepers maximise)."""
    hydra_config = HydraConfig.get()
    in_sweep = hydra_config.mode == RunMode.MULTIRUN
    try:
        run = parse_run_config(cfg)
        threads = threads_per_parallel_job(hydra_config.launcher)
        if in_sweep and threads is not None and run.trainer.num_threads is None:
            log.info("jobs run side by side: %d torch thread(s) each", threads)
            run = replace(run, trainer=replace(run.trainer, num_threads=threads))
        hparams = hparams_of(cfg, dict(hydra_config.runtime.choices), hydra_config.overrides.task)
        run_dir = Path(hydra_config.runtime.output_dir)
        results = train(run, run_dir, OmegaConf.to_container(cfg, resolve=True), hparams=hparams)
    except TrainingDiverged as err:
        log.error("error: %s", err)
        if in_sweep:
            log.info("returning %s to the sweeper for this diverged job", DIVERGED_VALUE)
            return DIVERGED_VALUE
        sys.exit(err.exit_code)
    except UserError as err:
        log.error("error: %s", err)
        if in_sweep:
            raise  # the sweep records this job as failed and runs the others
        sys.exit(err.exit_code)
    except RunPreempted as stopped:
        log.warning("%s", stopped)
        # SystemExit, not the exception: Hydra would record a failed job and start the next
        # one, but a signal (Ctrl-C, SLURM preemption) is meant for the whole sweep.
        sys.exit(EXIT_PREEMPTED)
    return results["best_val_acc"]


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
    main()


if __name__ == "__main__":
    # Run the copy imported as stable_cnn.train, not this __main__ one: launchers that
    # pickle the task function (joblib, submitit) find it by its module's name.
    from stable_cnn.train import cli as package_cli

    package_cli()
