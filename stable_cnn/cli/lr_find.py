"""``stable-cnn-lr-find``: the learning-rate range test on the run ``stable-cnn-train``
would train with the same overrides; prints the suggested ``optimizer.lr`` and writes
lr_find.json, lr_find.png and TensorBoard scalars into its folder
(training/lr_finder.py does the work).

    stable-cnn-lr-find                              # the default recipe
    stable-cnn-lr-find model=resnet optimizer=adamw lr_find.num_steps=300
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stable_cnn.cli.conf import config_dir
from stable_cnn.cli.hydra_errors import run_reporting_hydra_errors
from stable_cnn.cli.run_folder import discard_if_unused
from stable_cnn.cli.train import parse_run_config
from stable_cnn.config import register_schemas
from stable_cnn.errors import ConfigError, UserError

log = logging.getLogger("stable_cnn")

register_schemas()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="lr_find")
def main(cfg: DictConfig) -> float:
    from stable_cnn.system.distributed import world_from_environment  # torch: after composing
    from stable_cnn.training.lr_finder import run_range_test

    folder = Path(HydraConfig.get().runtime.output_dir)
    try:
        run = parse_run_config(cfg)
        if world_from_environment().distributed or run.trainer.devices > 1:
            raise ConfigError(
                "stable-cnn-lr-find runs in one process: leave out torchrun and "
                "trainer.devices (the learning rate it finds is per process's batch)"
            )
        if run.trainer.resume is not None:
            raise ConfigError("trainer.resume: stable-cnn-lr-find always starts afresh")
        settings = OmegaConf.to_object(cfg.lr_find)
        finding = run_range_test(run, settings, folder)
    except UserError as err:
        log.error("error: %s", err)
        discard_if_unused(folder)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # this job fails alone; the sweep's other jobs go on
        sys.exit(err.exit_code)
    print(
        f"suggested optimizer.lr={finding.suggested_lr:.3g} (max stable "
        f"{finding.max_stable_lr:.3g}; lr_find.json and lr_find.png in {folder})"
    )
    return finding.suggested_lr


def cli() -> None:
    run_reporting_hydra_errors(main, "stable-cnn-lr-find")


if __name__ == "__main__":
    from stable_cnn.cli.lr_find import cli as package_cli

    package_cli()
