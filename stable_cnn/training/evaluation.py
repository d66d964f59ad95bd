"""``stable-cnn-eval``: test a checkpoint on a dataset's test split.

    stable-cnn-eval checkpoint=outputs/<date>/<time>/checkpoints/best.pt
    stable-cnn-eval checkpoint=... data.root=/data       # any data.* key changes the run's own
    stable-cnn-eval checkpoint=... data=mnist            # another dataset of the same shape

The model is rebuilt from the checkpoint's own model config; the data, precision and
memory layout default to the checkpoint's run, so the test accuracy is the run's own.
Writes eval.json and confusion.png into ``out=``, by default eval/<checkpoint>-<data>/ in
the checkpoint's run folder (``outputs/<date>/<time>/eval/best-fashion_mnist/``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, ValidationError

from stable_cnn.cli.hydra_errors import run_reporting_hydra_errors
from stable_cnn.cli.train import config_dir
from stable_cnn.config import DataConfig, register_schemas
from stable_cnn.data.build import build_splits
from stable_cnn.data.splits import DataSplits
from stable_cnn.data.tensors import TensorBatches
from stable_cnn.deploy.trained_model import checkpoint_path, rebuild_model, run_folder_of
from stable_cnn.errors import ConfigError, UserError
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.state.checkpoint import CheckpointError, load_checkpoint
from stable_cnn.system.atomic import atomic_write
from stable_cnn.system.hardware import (
    Runtime,
    choose_memory_format,
    choose_precision,
    resolve_device,
)
from stable_cnn.training.diagnostics import confusion_figure, per_class_accuracy
from stable_cnn.training.epoch import evaluate

log = logging.getLogger("stable_cnn")


def check_data_fits(model_config: dict[str, Any], data: DataConfig, path: Path) -> None:
    """One line, before any data is read, when the images or classes do not fit the model."""
    trained = (model_config["in_channels"], model_config["num_classes"])
    given = (data.in_channels, data.num_classes)
    if given[0] != trained[0] or (given[1] is not None and given[1] != trained[1]):
        raise CheckpointError(
            f"checkpoint {path} was trained on {trained[0]}-channel images with {trained[1]} "
            f"classes; data={data.name} has {given[0]} channels and {given[1]} classes: "
            f"evaluate it on data of the same kind"
        )


@dataclass
class LoadedCheckpoint:
    model: SmallCNN  # weights loaded, on the device
    runtime: Runtime  # the precision and layout its run used
    splits: DataSplits
    data: DataConfig  # what it is evaluated on: the override, else the run's own
    averaged: bool  # the weights are the run's average (ema=on), as the run tested them


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


def load_for_evaluation(
    path: Path,
    data: DataConfig | None,
    device_name: str,
    data_overrides: dict[str, Any] | None = None,
) -> LoadedCheckpoint:
    """The checkpoint's model, ready to evaluate on ``data`` (else the run's own data with
    ``data_overrides``, e.g. another ``root``)."""
    state = load_checkpoint(path)
    model, averaged = rebuild_model(state, path)
    saved = state["config"]
    data = data or with_overrides(DataConfig(**saved["data"]), data_overrides or {})
    check_data_fits(state["model_config"], data, path)

    device = resolve_device(device_name)
    amp = saved.get("amp", {}).get("name", "auto")
    channels_last = saved.get("trainer", {}).get("channels_last")
    trained = state.get("runtime")
    if trained is not None and state.get("device_type") == device.type:
        # the precision and layout the run resolved (on this kind of device), not auto's
        amp = {"fp32": "off"}.get(trained["precision"], trained["precision"])
        channels_last = trained["channels_last"]
    precision = choose_precision(amp, device)
    memory_format = choose_memory_format(device, channels_last)
    seed = saved.get("trainer", {}).get("seed", 0)
    # the training images stay on the CPU: a test needs only its own split on the device
    splits = build_splits(data, device, seed, train_device=torch.device("cpu"))
    model.to(device, memory_format=memory_format)
    return LoadedCheckpoint(model, Runtime(device, precision, memory_format), splits, data,
                            averaged)  # fmt: skip


def evaluate_checkpoint(
    path: Path,
    data: DataConfig | None,
    device_name: str,
    out_dir: Path | None,
    data_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test the checkpoint at ``path``; returns (and writes into ``out_dir``, by default
    eval/<checkpoint>-<data>/ in its run folder) eval.json's content."""
    loaded = load_for_evaluation(path, data, device_name, data_overrides)
    if out_dir is None:
        out_dir = run_folder_of(path) / "eval" / f"{path.stem}-{loaded.data.name}"
    model, runtime, splits, tta = loaded.model, loaded.runtime, loaded.splits, loaded.data.tta_flip
    stats = evaluate(model, splits.test, runtime, tta)
    classes = splits.info.class_names
    per_class = per_class_accuracy(stats.confusion)
    result = {
        "checkpoint": str(path),
        "data": splits.info.name,
        "test_acc": stats.accuracy,
        "test_loss": stats.loss,
        "images": stats.images,
        "precision": runtime.precision.name,
        "weights": "ema" if loaded.averaged else "last step",
        "tta_flip": tta,
        "per_class_acc": dict(zip(classes, per_class, strict=True)),
        "confusion": stats.confusion.tolist(),  # rows: true class, columns: predicted
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot write to {out_dir} ({err.strerror}): set out= to a "
                          f"folder you can write") from None  # fmt: skip
    with atomic_write(out_dir / "eval.json") as out:
        out.write((json.dumps(result, indent=2) + "\n").encode())
    figure = confusion_figure(stats.confusion, classes, f"{splits.info.name} test, {path.name}")
    if figure is not None:
        figure.savefig(out_dir / "confusion.png", dpi=110)
    return {**result, "written": str(out_dir / "eval.json")}


def training_accuracy(path: Path, count: int = 5000, device_name: str = "auto") -> float:
    """Accuracy on the first ``count`` training images as a test sees them: no
    augmentation, dropout off. Minus validation accuracy, it measures overfitting."""
    loaded = load_for_evaluation(path, None, device_name)
    model, runtime, splits = loaded.model, loaded.runtime, loaded.splits
    train = splits.train
    if not isinstance(train, TensorBatches):
        raise ConfigError(f"training accuracy needs in-memory data, not data={splits.info.name}")
    device = runtime.device
    seen = TensorBatches(train.images[:count].to(device), train.labels[:count].to(device), 1024,
                         train.mean, train.std, train=False)  # fmt: skip
    return evaluate(model, seen, runtime).accuracy


def describe(result: dict[str, Any]) -> str:
    lines = [f"{result['data']} test: {result['test_acc']:.2f}% of {result['images']} images "
             f"(loss {result['test_loss']:.4f}, {result['precision']}, "
             f"{result['weights']} weights)", "per class:"]  # fmt: skip
    width = max(len(name) for name in result["per_class_acc"])
    lines += [f"  {name:<{width}}  {acc:6.2f}%" for name, acc in result["per_class_acc"].items()]
    return "\n".join(lines)


register_schemas()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> float:
    try:
        path = checkpoint_path(cfg.checkpoint)
        hydra_config = HydraConfig.get()
        chosen = hydra_config.runtime.choices.get("data") is not None  # data=<option>
        data = OmegaConf.to_object(cfg.data) if chosen else None
        # without data=<option>, the data.* keys given (the rest are ???) change the run's own
        overrides = {} if chosen else {
            key: cfg.data[key] for key in cfg.data if not OmegaConf.is_missing(cfg.data, key)
        }  # fmt: skip
        out_dir = Path(cfg.out).expanduser() if cfg.out else None
        result = evaluate_checkpoint(path, data, cfg.device, out_dir, overrides)
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(err.exit_code)
    log.info("%s", describe(result))
    log.info("wrote %s", result["written"])
    return result["test_acc"]


def cli() -> None:
    run_reporting_hydra_errors(main, "stable-cnn-eval")


if __name__ == "__main__":
    from stable_cnn.training.evaluation import cli as package_cli

    package_cli()
