"""The amp group (conf/amp/): mixed precision (auto, fp16, bf16, off)."""

from __future__ import annotations

from dataclasses import dataclass

from stable_cnn.config.checks import check_choice


@dataclass
class AmpConfig:
    name: str = "auto"  # auto | fp16 | bf16 | off

    def __post_init__(self) -> None:
        check_choice("amp", self.name, ("auto", "fp16", "bf16", "off"))
