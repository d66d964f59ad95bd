"""Code of the user's own, named in the config as PACKAGE.MODULE.CALLABLE (``model._target_``,
``data._target_``) and imported where the command runs."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from stable_cnn.errors import ConfigError


def find_callable(target: str, key: str) -> Callable[..., Any]:
    """``target`` (PACKAGE.MODULE.CALLABLE), imported; one line naming ``key`` (the config
    key that named it) when it cannot be."""
    module_name, _, attribute = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{key}={target}: cannot import {module_name} ({err}): put its package "
            f"on PYTHONPATH (or install it) where the command runs"
        ) from None
    found = getattr(module, attribute, None)
    if not callable(found):
        raise ConfigError(f"{key}={target}: {module_name} has no callable {attribute!r}")
    return found


def accepted(build: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """Those of ``offered`` that ``build``'s signature names (all of them where it takes
    ``**kwargs``, or where it has no signature Python can read)."""
    try:
        parameters = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):  # a builtin, or a callable without a signature
        return dict(offered)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(offered)
    named = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {key: value for key, value in offered.items() if key in named}
