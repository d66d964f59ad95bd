"""The optimizer group (conf/optimizer/): SGD or AdamW and their settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from stable_cnn.config.checks import check, check_kind

# The group's options (tests/test_config.py checks them against conf/optimizer/).
OPTIMIZER_OPTIONS = ("adamw", "sgd", "tutorial_sgd")


@dataclass
class OptimizerConfig:
    name: str = MISSING
    # peak learning rate, or auto: the range test's suggestion (stable-cnn-lr-find)
    lr: Any = MISSING
    weight_decay: float = 0.0  # L2 penalty (SGD) or decoupled decay (AdamW)
    decay_norm_and_bias: bool = False  # also decay BatchNorm weights and all biases

    def __post_init__(self) -> None:
        kind = type(self).__dataclass_fields__["name"].default
        check_kind("optimizer", self, kind, OPTIMIZER_OPTIONS)
        number = isinstance(self.lr, int | float) and not isinstance(self.lr, bool)
        check(
            self.lr == "auto" or (number and self.lr > 0),
            "optimizer.lr",
            self.lr,
            "must be a number > 0 or auto (the learning-rate range test's suggestion)",
        )
        check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: Any = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "must be in [0, 1)")
        check(
            not self.nesterov or self.momentum > 0,
            "optimizer.nesterov",
            self.nesterov,
            "needs optimizer.momentum > 0",
        )


@dataclass
class AdamWConfig(OptimizerConfig):
    name: str = "adamw"
    lr: Any = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            list(self.betas),
            "must be two values in [0, 1)",
        )
        check(self.eps > 0, "optimizer.eps", self.eps, "must be > 0")
