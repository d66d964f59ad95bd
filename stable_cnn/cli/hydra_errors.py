"""Hydra's own mistakes (an unknown key or option, a value of the wrong type, an override
it cannot parse) reported as stable-cnn reports its own: one ``error: ...`` line that
names the problem and the fix, and exit status 2, instead of Hydra's several lines.

Hydra prints its compact report unless HYDRA_FULL_ERROR is set; the console commands set
it and catch the exception themselves (a crash inside a command still shows its whole
traceback, which is what HYDRA_FULL_ERROR asks for).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

import stable_cnn.config
from stable_cnn.cli.extra_keys import nearest_key
from stable_cnn.config import TAKES_KWARGS
from stable_cnn.errors import UserError

# Lines of Hydra's messages that are about Hydra, not about the mistake.
NOISE = (
    "Set the environment variable",
    "Config search path",
    "provider=",
    "full_key:",
    "object_type=",
    "reference_type=",
    "See https://hydra.cc",
)


# Keys that were renamed, with what to write today.
RENAMED_KEYS = {
    "data.in_memory": (
        "write data.cache=memory for true, data.cache=none for false, data.cache=auto for "
        "null, or data.cache=disk (docs/data.md#the-image-cache)"
    ),
}


def describe(err: BaseException, program: str) -> str:
    """The mistake in one line, with the fix."""
    text = str(err)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if isinstance(err, MissingConfigException) and missing:
        group, option = missing.groups()
        listed = text.split(f"Available options in '{group}':")[-1].split("Config search path")[0]
        options = sorted(line.strip() for line in listed.splitlines() if line.strip())
        known = f"use one of {', '.join(options)}" if options else "check the name"
        return f"{group}={option} is not an option of {group}: {known}"
    cause = err.__cause__
    variant = re.search(r"In 'ablation/(\w+)'", text)
    missing_key = re.search(r"Key '(\w+)' not in '(\w+)'", text + str(cause))
    if variant and missing_key:
        return (
            f"ablation={variant.group(1)} changes model.{missing_key.group(1)}, which "
            f"{missing_key.group(2)} does not have: the ablation's and the stability map's "
            f"variants are the SmallCNN's (model=small_cnn)"
        )
    key = re.search(r"Could not override '([^']+)'", text)
    if isinstance(err, OverrideParseException):
        return (
            f"cannot read the override {err.override!r} ({_meaningful_lines(text)[0]}): "
            f"write it as key=value, quoting values with spaces or brackets"
        )
    if key and isinstance(cause, ConfigKeyError | ConfigAttributeError):
        name = key.group(1)
        schema = re.search(r"not in '(\w+)'", str(cause))
        where = f" ({schema.group(1)})" if schema else ""
        if name.startswith("model.") and schema and schema.group(1) != "SmallCNNConfig":
            return (
                f"{name} is not a key of this model{where}: width, depth, dropout, "
                f"head_dropout, hidden and batchnorm belong to model=small_cnn; "
                f"`{program} --cfg job` lists this model's keys"
            )
        if name in RENAMED_KEYS:
            return f"{name} is no longer a key: {RENAMED_KEYS[name]}"
        group, _, leaf = name.rpartition(".")
        schema_class = getattr(stable_cnn.config, schema.group(1), None) if schema else None
        known = [f.name for f in fields(schema_class)] if is_dataclass(schema_class) else []
        near = nearest_key(leaf, known)
        meant = f"did you mean {group}.{near}?" if near and group else "check the spelling"
        takes = isinstance(schema_class, type) and issubclass(schema_class, TAKES_KWARGS)
        argument = f"; +{name}=... passes it to your callable" if takes else ""
        return (
            f"{name} is not a key of this config{where}: {meant} (`{program} --cfg job` "
            f"lists every key){argument}"
        )
    present = re.search(r"An item is already at '([^']+)'", text + str(cause))
    if present:
        name = present.group(1)
        return f"{name} is a key already: write {name}=VALUE, without the +"
    merging = re.search(r"Error merging override (\S+)", text)
    if merging and isinstance(cause, OmegaConfBaseException):
        reason = _meaningful_lines(str(cause))[0]
        return f"{merging.group(1)}: {reason}"
    lines = _meaningful_lines(text)
    if cause is not None and not isinstance(cause, HydraException):
        lines += _meaningful_lines(str(cause))[:1]
    return "; ".join(lines[:2]) or type(err).__name__


def _meaningful_lines(text: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith(NOISE)
    ]


FULL_ERROR_SET_HERE = "STABLE_CNN_SET_HYDRA_FULL_ERROR"


def run_reporting_hydra_errors(main: Callable[[], object], program: str) -> None:
    """Run a ``@hydra.main`` function; Hydra's own errors become one line and exit 2."""
    if "HYDRA_FULL_ERROR" in os.environ:  # the user asked for Hydra's full report
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ[FULL_ERROR_SET_HERE] = "1"  # not the user's: a search's workers drop it
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"{program}: error: {describe(err, program)}", file=sys.stderr)
        sys.exit(2)
    except UserError as err:  # raised outside a job: by the sweeper (hparams_search=optuna)
        print(f"{program}: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
