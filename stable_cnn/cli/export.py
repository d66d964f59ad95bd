"""``stable-cnn-export``: a checkpoint as a file other runtimes load (deploy/export.py).

    stable-cnn-export checkpoint=outputs/<date>/<time>            # .../export/best.onnx
    stable-cnn-export checkpoint=.../best.pt format=pt2 out=model.pt2

After writing, the file is loaded back and its outputs compared with the checkpoint's;
a disagreement fails the command.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from stable_cnn.cli.conf import config_dir, trust_code
from stable_cnn.cli.hydra_errors import run_reporting_hydra_errors
from stable_cnn.deploy.export import FORMATS, card_path, export_model
from stable_cnn.deploy.trained_model import load_trained_model
from stable_cnn.errors import ConfigError, UserError
from stable_cnn.state.run_files import checkpoint_path, run_folder_of

log = logging.getLogger("stable_cnn")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.format not in FORMATS:
            raise ConfigError(f"format={cfg.format!r} is not known: use format=onnx or format=pt2")
        path = checkpoint_path(cfg.checkpoint)
        suffix = FORMATS[cfg.format]
        default = run_folder_of(path) / "export" / f"{path.stem}{suffix}"
        out = Path(cfg.out).expanduser() if cfg.out else default
        if out.suffix != suffix:  # stable-cnn-predict tells the formats apart by it
            raise ConfigError(
                f"out={cfg.out} does not end in {suffix}, as format={cfg.format} "
                f"files do: name it *{suffix}"
            )
        trained = load_trained_model(path, trust_code(cfg.trust_code))
        result = export_model(trained, cfg.format, out)
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(err.exit_code)
    card = trained.card
    log.info(
        "wrote %s (%s, %s weights of %s): float images in [0, 1] of shape (N, %d, %d, %d) "
        "-> logits for %d classes",
        result.out,
        result.format,
        "averaged (ema)" if card.weights == "ema" else "the trained",
        card.taken,
        card.in_channels,
        card.image_size,
        card.image_size,
        len(card.class_names),
    )
    log.info(
        "checked with %s: largest logit difference from the checkpoint %.2e",
        result.checked_with,
        result.largest_difference,
    )
    log.info("wrote %s", card_path(result.out))


def cli() -> None:
    run_reporting_hydra_errors(main, "stable-cnn-export")


if __name__ == "__main__":
    from stable_cnn.cli.export import cli as package_cli

    package_cli()
