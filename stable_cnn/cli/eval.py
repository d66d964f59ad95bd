"""``stable-cnn-eval``: test a checkpoint on a dataset's test split.

    stable-cnn-eval checkpoint=outputs/<date>/<time>/checkpoints/best.pt
    stable-cnn-eval checkpoint=... data.root=/data       # any data.* key changes the run's own
    stable-cnn-eval checkpoint=... data=image_folder data.root=photos/  # your images, same classes

Writes eval.json and confusion.png into ``out=``, by default eval/<checkpoint>-<data>/ in
the checkpoint's run folder (training/evaluation.py does the work).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, ValidationError

from stable_cnn.cli.conf import config_dir, trust_code
from stable_cnn.cli.extra_keys import typed, with_kwargs
from stable_cnn.cli.hydra_errors import run_reporting_hydra_errors
from stable_cnn.config import DataConfig, register_schemas
from stable_cnn.errors import ConfigError, UserError
from stable_cnn.state.run_files import checkpoint_path
from stable_cnn.training.evaluation import describe, evaluate_checkpoint

log = logging.getLogger("stable_cnn")


def with_overrides(data: DataConfig, overrides: dict[str, Any]) -> DataConfig:
    """``data`` with some of its keys changed, type-checked as the command line would be."""
    if not overrides:
        return data
    try:
        merged = OmegaConf.merge(OmegaConf.structured(data), overrides)
        return OmegaConf.to_object(merged)
    except ValidationError as err:
        key = getattr(err, "full_key", None) or "data"
        raise ConfigError(f"data.{key}: {str(err).splitlines()[0]}") from None


def with_local_paths(saved: DataConfig) -> DataConfig:
    """The run's data where this installation keeps it: ``root`` and ``system_dir`` from
    its own data option, not from the checkpoint, which never picks a folder to read a
    system copy into (data.root=... still moves it). An image folder, whose option has no
    root of its own, is read where the run read it: reading a folder writes nothing."""
    option = Path(config_dir()) / "data" / f"{saved.name}.yaml"
    if saved.name == "custom" or not option.is_file():
        return saved
    local = OmegaConf.load(option)
    paths = {"system_dir": local.get("system_dir")}
    if "root" in local and not OmegaConf.is_missing(local, "root"):
        paths["root"] = str(local.root)  # resolves ${oc.env:STABLE_CNN_DATA,./data}
    return replace(saved, **paths)


register_schemas()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> float:
    try:
        path = checkpoint_path(cfg.checkpoint)
        hydra_config = HydraConfig.get()
        chosen = hydra_config.runtime.choices.get("data") is not None  # data=<option>
        data = with_kwargs("data", typed("data", cfg.data), cfg.data) if chosen else None
        # without data=<option>, the data.* keys given (the rest are ???) change the run's own
        overrides = (
            {}
            if chosen
            else {key: cfg.data[key] for key in cfg.data if not OmegaConf.is_missing(cfg.data, key)}
        )
        out_dir = Path(cfg.out).expanduser() if cfg.out else None
        result = evaluate_checkpoint(
            path,
            data,
            cfg.device,
            out_dir,
            lambda saved: with_overrides(with_local_paths(saved), overrides),
            trust_code(cfg.trust_code),
        )
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(err.exit_code)
    log.info("%s", describe(result))
    log.info("wrote %s", result["written"])
    return result["test_acc"]


def cli() -> None:
    run_reporting_hydra_errors(main, "stable-cnn-eval")


if __name__ == "__main__":
    from stable_cnn.cli.eval import cli as package_cli

    package_cli()
