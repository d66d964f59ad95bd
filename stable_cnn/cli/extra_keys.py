"""Keys a command line adds to a group (``+model.KEY=VALUE``, ``+data.KEY=VALUE``): the
keyword arguments of the options that call something (timm, your model, your dataset).
Every other group refuses a key of its own like a misspelt one, naming the nearest key."""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from stable_cnn.config import TAKES_KWARGS, schema_of
from stable_cnn.errors import ConfigError


def nearest_key(name: str, known: list[str]) -> str | None:
    """The key ``name`` was probably meant as: one that contains it (patience ->
    early_stopping_patience), else the closest spelling."""
    containing = [key for key in known if len(name) >= 4 and (name in key or key in name)]
    if containing:
        return min(containing, key=len)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return close[0] if close else None


def with_kwargs(group: str, config: Any, composed: DictConfig) -> Any:
    """The group's config with the keys that ``+GROUP.KEY=VALUE`` added: keyword arguments
    of a timm or custom model, or of a custom dataset's callable; for the other options
    and groups, a key they do not have is one line."""
    if not is_dataclass(config):
        return config
    known = [f.name for f in fields(config) if not f.name.startswith("_")]
    extra = {key: composed[key] for key in composed if key not in known and key != "_target_"}
    if not extra:
        return config
    if not isinstance(config, TAKES_KWARGS):
        key = next(iter(extra))
        option = f"{group}={config.name}" if hasattr(config, "name") else group
        near = nearest_key(key, known)
        meant = f"did you mean {group}.{near}? " if near else "check the spelling "
        takers = {
            "model": "; model=timm and model=custom take extra keyword arguments this way",
            "data": "; data=custom takes extra keyword arguments this way",
        }
        raise ConfigError(
            f"{group}.{key} is not a key of {option}: {meant}(`stable-cnn-train --cfg job` "
            f"lists the keys){takers.get(group, '')}"
        )
    kwargs = {**config.kwargs, **OmegaConf.to_container(OmegaConf.create(extra), resolve=True)}
    return replace(config, kwargs=kwargs)


def typed(group: str, node: DictConfig) -> Any:
    """A group's composed config as its schema's object; a group composed untyped (your
    model's or dataset's, whose YAML may hold the callable's arguments beside
    ``_target_``) is typed here from the keys its schema knows."""
    if OmegaConf.get_type(node) is not dict:
        return OmegaConf.to_object(node)
    schema = schema_of(group, OmegaConf.to_container(node, resolve=False))
    if schema is None:
        return OmegaConf.to_object(node)
    known = {f.name for f in fields(schema)}
    try:  # resolved where the node sits, so that ${trainer.seed} and the like still work
        values = OmegaConf.to_container(node, resolve=True)
        values = {key: value for key, value in values.items() if key in known}  # the rest: kwargs
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:  # name the key as the command line does
        key = f"{group}.{err.full_key}" if getattr(err, "full_key", None) else group
        if isinstance(err, MissingMandatoryValue):
            raise ConfigError(
                f"{key} is required here and has no value: add {key}=... to the command line"
            ) from None
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
