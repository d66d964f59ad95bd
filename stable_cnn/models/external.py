"""Models stable-cnn does not define: any of timm's by name, and a callable of your own
(``model._target_``). Both get the data's input channels and classes."""

from __future__ import annotations

from typing import Any

from torch import nn

from stable_cnn.errors import ConfigError
from stable_cnn.system.imports import find_callable


def timm_model(
    name: str, in_channels: int, num_classes: int, pretrained: bool, kwargs: dict[str, Any]
) -> nn.Module:
    """``timm.create_model(name, ...)`` with the data's channels and classes."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "model=timm needs the timm package: pip install "
            "'stable-cnn[timm]' (or pip install timm)"
        ) from None
    if not timm.is_model(name):
        near = ", ".join(timm.list_models(f"*{name[:4]}*")[:8]) or "timm.list_models()"
        raise ConfigError(
            f"model.name={name!r} is not a timm model: use one timm knows, e.g. {near}"
        )
    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except TypeError as err:  # a keyword the model does not take
        raise ConfigError(
            f"model=timm model.name={name}: {err}: check the +model.KEY values"
        ) from None
    except Exception as err:  # no internet for pretrained weights, among others
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ConfigError(
            f"model=timm model.name={name}: timm could not build it ({reason})"
        ) from None


def custom_model(
    target: str, in_channels: int, num_classes: int, image_size: int, kwargs: dict[str, Any]
) -> nn.Module:
    """The user's model, checked once on two blank images: an nn.Module that maps
    (N, C, H, W) float images to (N, num_classes) logits."""
    build = find_callable(target, "model._target_")
    try:
        model = build(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs
        )
    except TypeError as err:
        raise ConfigError(
            f"model._target_={target}: {err}: it is called with in_channels, num_classes, "
            f"image_size and the +model.KEY values"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={target} returned a {type(model).__name__}, not an nn.Module"
        )
    return model
