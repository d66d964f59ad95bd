"""A trained model outside the trainer: rebuilt from its checkpoint, fed plain pixels.

``stable-cnn-eval``, ``stable-cnn-export`` and ``stable-cnn-predict`` start here. The
checkpoint holds everything needed: the model config, the weights (and their average
with ``ema=on``, which the run itself validated and tested), and the data config whose
normalisation the model expects.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stable_cnn.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from stable_cnn.errors import ConfigError
from stable_cnn.models import SmallCNN

log = logging.getLogger("stable_cnn")


def checkpoint_path(given: str | None) -> Path:
    """``checkpoint=...`` as a path: a .pt file, or a run folder (its checkpoints/best.pt)."""
    if given is None:
        raise ConfigError("checkpoint=... is required: the path of a .pt file or run folder")
    path = Path(given).expanduser()
    return path / "checkpoints" / "best.pt" if path.is_dir() else path


def rebuild_model(state: dict[str, Any], path: Path) -> tuple[SmallCNN, bool]:
    """The checkpoint's SmallCNN on the CPU with its weights loaded: the average when the
    run trained with ``ema=on`` (what it validated, kept and tested). Returns the model
    and whether the weights are the average."""
    model_config = state.get("model_config")
    if model_config is None or "data" not in (state.get("config") or {}):
        raise CheckpointError(f"{path} holds no model config: it was not written by stable-cnn")
    model = SmallCNN.from_config(model_config)
    averaged = state.get("ema") is not None
    if averaged:
        state = {**state, "model": state["ema"]["model"]}
    load_model_weights(model, state, path)
    return model, averaged


@dataclass(frozen=True)
class ModelCard:
    """What a user of the model needs to feed it and read its output."""

    class_names: tuple[str, ...]
    in_channels: int
    image_size: int  # the model was trained on image_size x image_size images
    mean: tuple[float, ...]  # the data's normalisation, applied inside PixelClassifier
    std: tuple[float, ...]
    data: str  # the dataset it was trained on
    weights: str  # "ema" (the run's average) or "last step"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input": "float32 images in [0, 1], shape (N, C, H, W)"}


class PixelClassifier(nn.Module):
    """The trained model with its data's normalisation inside: float images in [0, 1],
    shape (N, C, H, W), in; logits, shape (N, classes), out. A user feeds pixels, not
    the training set's statistics."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


@dataclass
class TrainedModel:
    classifier: PixelClassifier  # eval mode, fp32, on the CPU
    card: ModelCard
    path: Path  # the checkpoint it came from


def load_trained_model(path: Path) -> TrainedModel:
    """The checkpoint at ``path`` as a PixelClassifier in eval mode, with its card."""
    state = load_checkpoint(path)
    model, averaged = rebuild_model(state, path)
    data = state["config"]["data"]
    classes = state["model_config"]["num_classes"]
    class_names = tuple(state.get("class_names") or ())
    if len(class_names) != classes:  # written before checkpoints carried the names
        class_names = tuple(f"class_{i}" for i in range(classes))
        log.warning("%s does not name its classes (an older checkpoint): using class_0.."
                    "class_%d", path, classes - 1)  # fmt: skip
    card = ModelCard(
        class_names=class_names,
        in_channels=state["model_config"]["in_channels"],
        image_size=int(data["image_size"]),
        mean=tuple(float(m) for m in data["mean"]),
        std=tuple(float(s) for s in data["std"]),
        data=str(data["name"]),
        weights="ema" if averaged else "last step",
    )
    classifier = PixelClassifier(model, card.mean, card.std).eval()
    return TrainedModel(classifier, card, path)
