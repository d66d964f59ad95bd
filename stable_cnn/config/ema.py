"""The ema group (conf/ema/): an average of the weights, validated, kept and tested."""

from __future__ import annotations

from dataclasses import dataclass

from stable_cnn.config.checks import check, check_choice


@dataclass
class EmaConfig:
    name: str = "off"  # off | on
    decay: float = 0.999  # per optimizer step: the average spans about 1 / (1 - decay) steps
    warmup: bool = True  # decay rises as (1 + n) / (10 + n) until it reaches `decay`

    def __post_init__(self) -> None:
        check_choice("ema", self.name, ("off", "on"))
        check(0 < self.decay < 1, "ema.decay", self.decay, "must be in (0, 1), e.g. 0.999")
