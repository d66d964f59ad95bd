"""Models stable-cnn does not define: any of timm's by name, and a callable of your own
(``model._target_``). Both get the data's input channels and classes (yours: those of
them, and of the image size, that its constructor names)."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from stable_cnn.errors import ConfigError
from stable_cnn.system.imports import accepted, find_callable

log = logging.getLogger("stable_cnn")


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
    (N, C, H, W) float images to (N, num_classes) logits. It is given those of
    in_channels, num_classes and image_size its constructor names (all three where it
    takes **kwargs), and every +model.KEY value."""
    offered = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    for key in sorted(offered.keys() & kwargs.keys())[:1]:  # the data says them, not +model
        raise ConfigError(
            f"+model.{key}={kwargs[key]}: {key} comes from the data ({offered[key]}): drop it"
        )
    build = find_callable(target, "model._target_")
    arguments = {**accepted(build, offered), **kwargs}
    left = [key for key in offered if key not in arguments]
    log.info(
        "model %s(%s)%s",
        target,
        ", ".join(f"{key}={value!r}" for key, value in arguments.items()),
        f": its constructor takes no {' or '.join(left)}" if left else "",
    )
    try:
        model = build(**arguments)
    except TypeError as err:
        raise ConfigError(
            f"model._target_={target}: {err}: it is given those of in_channels, num_classes "
            f"and image_size it names, and the +model.KEY values"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={target} returned a {type(model).__name__}, not an nn.Module"
        )
    return model
