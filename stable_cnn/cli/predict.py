"""``stable-cnn-predict``: a trained model's predictions for image files, as CSV
(deploy/predict.py).

    stable-cnn-predict checkpoint=outputs/<date>/<time> input=photos/   # predictions.csv
    stable-cnn-predict checkpoint=... input='shots/*.png' top_k=5
    stable-cnn-predict checkpoint=model.onnx input=photos/     # what stable-cnn-export wrote

A file that is not a readable image is named in one line and skipped; the exit status
is non-zero only when no image could be read.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from stable_cnn.cli.conf import config_dir, trust_code
from stable_cnn.cli.hydra_errors import run_reporting_hydra_errors
from stable_cnn.deploy.predict import find_images, predict_files
from stable_cnn.errors import ConfigError, DataError, UserError
from stable_cnn.state.run_files import checkpoint_path

log = logging.getLogger("stable_cnn")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        path = checkpoint_path(cfg.checkpoint)
        if cfg.input is None:
            raise ConfigError("input=... is required: an image file, a folder or a glob")
        if int(cfg.top_k) < 1:
            raise ConfigError(f"top_k={cfg.top_k} is not allowed: use top_k=1 or more")
        if not cfg.out:
            raise ConfigError("out=... is required: the CSV file to write (predictions.csv)")
        out = Path(cfg.out).expanduser()
        paths = find_images(str(cfg.input))
        rows, reader = predict_files(
            path, paths, int(cfg.top_k), cfg.device, out, trust_code(cfg.trust_code)
        )
        if rows == 0:
            raise DataError(
                f"none of the {len(paths)} file(s) in input={cfg.input} is an "
                f"image Pillow can read: point input at PNG/JPEG files"
            )
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(err.exit_code)
    size = reader.card.image_size
    if reader.resized:
        log.warning(
            "resized %d image(s) to %dx%d, the size the model was trained on",
            reader.resized,
            size,
            size,
        )
    skipped = f" ({len(reader.skipped)} unreadable file(s) skipped)" if reader.skipped else ""
    log.info("predicted %d image(s)%s: wrote %s", rows, skipped, out)


def cli() -> None:
    run_reporting_hydra_errors(main, "stable-cnn-predict")


if __name__ == "__main__":
    from stable_cnn.cli.predict import cli as package_cli

    package_cli()
