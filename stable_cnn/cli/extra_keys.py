"""Keys a command line adds to a group (``+model.KEY=VALUE``, ``+data.KEY=VALUE``): the
keyword arguments of the options that call something (timm, your model, your dataset)."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stable_cnn.config import TAKES_KWARGS
from stable_cnn.errors import ConfigError


def with_kwargs(group: str, config: Any, composed: DictConfig) -> Any:
    """The group's config with the keys that ``+GROUP.KEY=VALUE`` added: keyword arguments
    of a timm or custom model, or of a custom dataset's callable; for the other options,
    a key they do not have is one line."""
    known = {f.name for f in fields(config)}
    extra = {key: composed[key] for key in composed if key not in known}
    if not extra:
        return config
    if not isinstance(config, TAKES_KWARGS):
        key = next(iter(extra))
        takers = "model=timm and model=custom take" if group == "model" else "data=custom takes"
        raise ConfigError(
            f"{group}.{key} is not a key of {group}={config.name}: check the spelling "
            f"(`stable-cnn-train --cfg job` lists the keys); {takers} extra keyword "
            f"arguments this way"
        )
    kwargs = {**config.kwargs, **OmegaConf.to_container(OmegaConf.create(extra), resolve=True)}
    return replace(config, kwargs=kwargs)
