"""The optimizer group (conf/optimizer/): SGD, AdamW or Muon and their settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from stable_cnn.config.checks import check, check_kind

# The group's options (tests/test_config.py checks them against conf/optimizer/).
OPTIMIZER_OPTIONS = ("adamw", "muon", "sgd", "tutorial_sgd")


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


# torch.optim.Muon's ways of scaling an update to the weight's shape (its adjust_lr_fn;
# newer torch has a third, spectral_unclamped, that the torch on GPU machines lacks)
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


@dataclass
class MuonConfig(OptimizerConfig):
    """Muon (torch.optim.Muon) for the weights of the convolutions and hidden linear
    layers, each seen as a matrix (out, in x kernel), and an auxiliary SGD or AdamW for
    the rest: BatchNorm weights, biases and, unless ``muon_head``, the classifier."""

    name: str = "muon"
    lr: Any = 0.05  # Muon's learning rate (optimizer.lr=auto: the range test's)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0  # decoupled: each step shrinks the weights by lr x this
    ns_steps: int = 5  # Newton-Schulz iterations that orthogonalise the update
    adjust_lr: str = "original"  # original | match_rms_adamw
    muon_head: bool = False  # true: the classifier's weights train with Muon too
    auxiliary: str = "sgd"  # sgd | adamw, for what Muon does not train
    auxiliary_lr: float = 0.1
    auxiliary_momentum: float = 0.9  # SGD's momentum (Nesterov); AdamW's beta1
    auxiliary_weight_decay: float = 5e-4  # SGD's L2 penalty, AdamW's decoupled decay

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "must be in [0, 1)")
        check(1 <= self.ns_steps < 100, "optimizer.ns_steps", self.ns_steps, "must be in [1, 100)")
        check(
            self.adjust_lr in MUON_LR_ADJUSTMENTS,
            "optimizer.adjust_lr",
            self.adjust_lr,
            f"must be one of {', '.join(MUON_LR_ADJUSTMENTS)}",
        )
        check(
            self.auxiliary in ("sgd", "adamw"),
            "optimizer.auxiliary",
            self.auxiliary,
            "must be sgd or adamw",
        )
        check(self.auxiliary_lr > 0, "optimizer.auxiliary_lr", self.auxiliary_lr, "must be > 0")
        check(
            0 <= self.auxiliary_momentum < 1,
            "optimizer.auxiliary_momentum",
            self.auxiliary_momentum,
            "must be in [0, 1)",
        )
        check(
            self.auxiliary_weight_decay >= 0,
            "optimizer.auxiliary_weight_decay",
            self.auxiliary_weight_decay,
            "must be >= 0",
        )
