"""The scheduler group (conf/scheduler/): the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from stable_cnn.config.checks import check, check_choice, check_kind

# The group's options (tests/test_config.py checks them against conf/scheduler/).
SCHEDULER_OPTIONS = ("cosine", "none", "onecycle", "plateau", "step", "tutorial_cosine")


@dataclass
class SchedulerConfig:
    name: str = "none"  # the schedule this option builds; `none`: the learning rate stays

    def __post_init__(self) -> None:
        kind = type(self).__dataclass_fields__["name"].default
        check_kind("scheduler", self, kind, SCHEDULER_OPTIONS)


@dataclass
class CosineConfig(SchedulerConfig):
    name: str = "cosine"
    interval: str = "step"  # step the schedule once per "step" or per "epoch" (tutorial)
    warmup_epochs: float = 0.3  # linear warmup before the cosine decay, in epochs
    eta_min: float = 0.0  # learning rate at the end of the decay

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scheduler.interval", self.interval, ("epoch", "step"))
        check(
            self.warmup_epochs >= 0, "scheduler.warmup_epochs", self.warmup_epochs, "must be >= 0"
        )
        check(
            self.interval == "step" or float(self.warmup_epochs).is_integer(),
            "scheduler.warmup_epochs",
            self.warmup_epochs,
            "must be a whole number with scheduler.interval=epoch: add "
            "scheduler.warmup_epochs=0 (or 1), or use scheduler=tutorial_cosine",
        )
        check(self.eta_min >= 0, "scheduler.eta_min", self.eta_min, "must be >= 0")


@dataclass
class PlateauConfig(SchedulerConfig):
    name: str = "plateau"
    factor: float = 0.5  # multiply the LR by this when validation accuracy stalls
    patience: int = 2  # epochs without improvement before reducing
    threshold: float = 0.05  # improvement that counts, in accuracy points (absolute)
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.factor < 1, "scheduler.factor", self.factor, "must be in (0, 1)")
        check(self.patience >= 0, "scheduler.patience", self.patience, "must be >= 0")
        check(self.threshold >= 0, "scheduler.threshold", self.threshold, "must be >= 0")
        check(self.min_lr >= 0, "scheduler.min_lr", self.min_lr, "must be >= 0")


@dataclass
class StepConfig(SchedulerConfig):
    name: str = "step"
    step_size: int = 10  # epochs between reductions
    gamma: float = 0.1  # multiply the LR by this every step_size epochs

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.step_size >= 1, "scheduler.step_size", self.step_size, "must be >= 1")
        check(0 < self.gamma <= 1, "scheduler.gamma", self.gamma, "must be in (0, 1]")


@dataclass
class OneCycleConfig(SchedulerConfig):
    name: str = "onecycle"
    pct_start: float = 0.25  # fraction of all steps spent raising the LR to optimizer.lr
    div_factor: float = 25.0  # start LR = optimizer.lr / div_factor
    final_div_factor: float = 1e4  # final LR = start LR / final_div_factor
    # OneCycleLR also cycles SGD's momentum (AdamW's first beta) against the LR by default,
    # overriding optimizer.momentum; here that is asked for, not implied.
    cycle_momentum: bool = False
    base_momentum: float = 0.85  # with cycle_momentum: momentum at the LR's peak
    max_momentum: float = 0.95  # with cycle_momentum: momentum at the start and the end

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.pct_start < 1, "scheduler.pct_start", self.pct_start, "must be in (0, 1)")
        check(self.div_factor > 0, "scheduler.div_factor", self.div_factor, "must be > 0")
        check(
            self.final_div_factor > 0,
            "scheduler.final_div_factor",
            self.final_div_factor,
            "must be > 0",
        )
        check(
            0 <= self.base_momentum <= self.max_momentum < 1,
            "scheduler.base_momentum",
            self.base_momentum,
            f"must be in [0, scheduler.max_momentum={self.max_momentum}] and max_momentum < 1",
        )
