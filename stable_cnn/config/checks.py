"""Range checks for the schemas: one line per mistake, naming the key, the value and the fix."""

from __future__ import annotations

from typing import Any

from stable_cnn.errors import ConfigError


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    check(value in choices, key, value, "use one of " + ", ".join(choices))


def check_kind(group: str, config: Any, kind: str, options: tuple[str, ...]) -> None:
    """``<group>.name`` says which kind of optimizer or schedule the option builds; it is
    the option's to set, so another value is a mistake, not a switch."""
    check(
        config.name == kind,
        f"{group}.name",
        config.name,
        f"it names the {group} this option builds ({kind}); choose another with "
        f"{group}=<option>: {', '.join(options)}",
    )


def check_bounds(key: str, values: list[float], upper: float | None, example: str) -> None:
    """A [low, high] pair with 0 < low <= high (< upper)."""
    ok = len(values) == 2 and 0 < values[0] <= values[1] and (upper is None or values[1] < upper)
    below = f" < {upper}" if upper is not None else ""
    check(ok, key, list(values), f"must be [low, high] with 0 < low <= high{below}, e.g. {example}")
