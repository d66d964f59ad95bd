"""The model a run trains, or a checkpoint holds, from its spec: the model config's keys
and the data's input channels, classes and image size. The spec is what checkpoints
keep (``model_config``), so every command rebuilds the same model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stable_cnn.errors import ConfigError
from stable_cnn.models.external import custom_model, timm_model
from stable_cnn.models.resnet import resnet
from stable_cnn.models.small_cnn import SmallCNN


def kind_of(spec: dict[str, Any]) -> str:
    """small_cnn, resnet, timm or custom (checkpoints from before the others: small_cnn)."""
    return spec.get("kind", "small_cnn")


def build_model(spec: dict[str, Any], pretrained: bool = True) -> nn.Module:
    """The spec's model; ``pretrained=False`` skips downloadable weights (a checkpoint
    brings its own). A model that is not the SmallCNN is checked once on two blank images
    of the data's size, so that a mismatch is one line now, not a traceback later."""
    model = construct(spec, pretrained)
    if kind_of(spec) != "small_cnn":
        check_model(model, spec, describe_model(spec))
    return model


def construct(spec: dict[str, Any], pretrained: bool) -> nn.Module:
    kind, data = kind_of(spec), (spec["in_channels"], spec["num_classes"])
    if kind == "resnet":
        weights = spec.get("weights") if pretrained else None
        return resnet(spec["arch"], *data, spec["image_size"], spec.get("small_input"), weights)
    if kind == "timm":
        return timm_model(
            spec["name"],
            *data,
            pretrained and spec.get("pretrained", False),
            spec.get("kwargs", {}),
        )
    if kind == "custom":
        return custom_model(spec["target"], *data, spec["image_size"], spec.get("kwargs", {}))
    return SmallCNN.from_config(spec)


def describe_model(spec: dict[str, Any]) -> str:
    """One phrase for the run log."""
    kind = kind_of(spec)
    if kind == "resnet":
        stem = ", 3x3 stem for small images" if spec.get("small_input") else ""
        weights = f", {spec['weights']} weights" if spec.get("weights") else ""
        return f"torchvision {spec['arch']}{stem}{weights}"
    if kind == "timm":
        return f"timm {spec['name']}" + (", pretrained" if spec.get("pretrained") else "")
    if kind == "custom":
        return f"{spec['target']}" + "".join(f" {k}={v}" for k, v in spec.get("kwargs", {}).items())
    return f"SmallCNN width {spec['width']}, {spec.get('depth', 2)} ConvBlocks per stage"


def check_model(model: nn.Module, spec: dict[str, Any], what: str) -> None:
    """``model`` maps (N, C, H, W) float images of the data's shape to (N, classes) logits."""
    channels, classes, size = spec["in_channels"], spec["num_classes"], spec["image_size"]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, channels, size, size))
    except Exception as err:  # the model's own error, whatever its kind
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ConfigError(
            f"model {what} cannot take {channels}x{size}x{size} images ({reason}): choose a "
            f"model for images of this size (model=resnet adapts its stem to small images)"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(
            f"model {what} returned {shape} for images of shape (2, {channels}, {size}, "
            f"{size}): it must return logits of shape (N, {classes})"
        )
