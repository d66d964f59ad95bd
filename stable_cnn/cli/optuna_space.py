"""The space of an Optuna search and what a study must keep: Hydra's sweep expressions
(``interval``, ``tag(log, ...)``, ``choice``, ``range``) as Optuna distributions, the grid
they span, and the checks a continued study makes (the same ranges, the same settings)."""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer

from stable_cnn.errors import ConfigError


def distribution(override: Override) -> Any:
    """An Optuna distribution for a sweep expression, or the plain value of a fixed one."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode))
        )
    if override.is_range_sweep():  # Hydra's values: the stop excluded, any step
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        key = override.get_key_element()
        if len(values) < 2 or value.step <= 0:
            raise ConfigError(
                f"{key}={override.get_value_element_as_str()}: a range to search "
                f"needs two values or more, rising"
            )
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
        low, step = float(values[0]), float(value.step)
        high = round(low + (len(values) - 1) * step, 12)  # 0.9, not 0.8999999999999999
        return FloatDistribution(round(low, 12), high, step=step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ConfigError(f"hydra.sweeper.params: {override.input_line} is no sweep Optuna can take")


def search_space(expressions: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The searched keys with their distributions, and the fixed keys with their values."""
    from optuna.distributions import BaseDistribution

    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(expressions):
        made = distribution(override)
        key = override.get_key_element()
        if isinstance(made, BaseDistribution):  # the last word on a key wins, as in Hydra:
            space[key] = made  # the command line's over the stock space
            fixed.pop(key, None)
        else:
            fixed[key] = made
            space.pop(key, None)
    return space, fixed


def grid_of(space: dict[str, Any]) -> dict[str, list[Any]]:
    """Every value of each key, for sampler=grid (choices and ranges only)."""
    from optuna.distributions import CategoricalDistribution

    grid = {}
    for key, made in space.items():
        if isinstance(made, CategoricalDistribution):
            grid[key] = list(made.choices)
        elif getattr(made, "step", None) is not None:
            count = round((made.high - made.low) / made.step) + 1
            grid[key] = [made.low + k * made.step for k in range(count)]
        else:
            raise ConfigError(
                f"hydra.sweeper.sampler=grid needs a finite set for {key}: use choice(...) or "
                f"range(...), not interval(...)"
            )
    return grid


def check_same_space(study: Any, space: dict[str, Any], name: str) -> None:
    """One line where a continued study searched a key over another range or choice
    (Optuna cannot mix them in one study)."""
    from optuna.distributions import check_distribution_compatibility

    for trial in study.trials:
        for key, earlier in trial.distributions.items():
            if key in space:
                try:
                    check_distribution_compatibility(earlier, space[key])
                except ValueError:
                    raise ConfigError(
                        f"study {name} searched {key} as {earlier}, not {space[key]}: name "
                        f"another study with hydra.sweeper.study_name=..."
                    ) from None


def check_same_setting(study: Any, setting: dict[str, str], name: str) -> None:
    """A new study records ``setting``; a continued one refuses, in one line, a search
    whose values would mean something else (other data, another model, other epochs)."""
    recorded = study.user_attrs.get("setting")
    if recorded is None:
        study.set_user_attr("setting", setting)
        return
    differing = [key for key in setting if key in recorded and recorded[key] != setting[key]]
    if differing:
        shown = ", ".join(
            f"{key}={setting[key]} (the study's: {recorded[key]})" for key in differing[:3]
        )
        raise ConfigError(
            f"study {name} was started with other settings: {shown}; its trials would not "
            f"compare: name another study with hydra.sweeper.study_name=..."
        )
