"""The clipping group (conf/clipping/): gradient clipping by norm, by value, or none."""

from __future__ import annotations

from dataclasses import dataclass

from stable_cnn.config.checks import check, check_choice


@dataclass
class ClippingConfig:
    name: str = "none"  # norm | value | none
    max_norm: float | None = None  # norm: rescale gradients whose total L2 norm exceeds this
    max_value: float | None = None  # value: clamp every gradient element to +-max_value

    def __post_init__(self) -> None:
        check_choice("clipping.name", self.name, ("norm", "value", "none"))
        if self.name == "norm":
            check(
                self.max_norm is not None and self.max_norm > 0,
                "clipping.max_norm",
                self.max_norm,
                "must be > 0",
            )
        if self.name == "value":
            check(
                self.max_value is not None and self.max_value > 0,
                "clipping.max_value",
                self.max_value,
                "must be > 0",
            )
