"""Learning-rate schedules (conf/scheduler/) as functions of where the run is.

A schedule counts nothing itself: the rate for the next optimizer step is computed from
the run's own counters (``Counters.global_step`` for a per-step schedule, completed
epochs for a per-epoch one), so a resumed run's rate comes from the steps it saved,
whatever wrote the checkpoint. ReduceLROnPlateau is the one exception: it depends on
the accuracies it has seen, so it keeps them (mode max) and its state goes into the
checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from stable_cnn.config import (
    CosineConfig,
    OneCycleConfig,
    PlateauConfig,
    SchedulerConfig,
    StepConfig,
)

# The learning rates (and, for OneCycle, the momenta) of every parameter group at a
# position: optimizer steps taken, or completed epochs.
RatesAt = Callable[[int], tuple[list[float], list[float] | None]]


@dataclass
class WarmupCosine:
    """LR factor at step t: linear warmup over ``warmup`` steps, then cosine from 1 to
    ``min_factor`` over the remaining ``total - warmup``. With no warmup this is exactly
    CosineAnnealingLR(T_max=total)."""

    total: int
    warmup: int
    min_factor: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(step - self.warmup, self.total - self.warmup) / (self.total - self.warmup)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class OneCycle:
    """torch's OneCycleLR (two phases, cosine annealing) as a function of the step: the
    rate rises from peak / div_factor to the peak over ``pct_start`` of the steps, then
    falls to peak / div_factor / final_div_factor; the momentum moves the other way."""

    peaks: list[float]  # one per parameter group (optimizer=muon has two)
    total: int
    config: OneCycleConfig

    def __call__(self, step: int) -> tuple[list[float], list[float] | None]:
        step = min(step, self.total)  # past its end the cycle would rise again
        rise_end = float(self.config.pct_start * self.total) - 1  # torch's phase boundary
        if step <= rise_end:
            pct, rising = step / rise_end, True
        else:
            pct, rising = (step - rise_end) / (self.total - 1 - rise_end), False
        rates = []
        for peak in self.peaks:
            start = peak / self.config.div_factor
            low, high = (start, peak) if rising else (peak, start / self.config.final_div_factor)
            rates.append(anneal(low, high, pct))
        if not self.config.cycle_momentum:
            return rates, None
        top, bottom = self.config.max_momentum, self.config.base_momentum
        momentum = anneal(top, bottom, pct) if rising else anneal(bottom, top, pct)
        return rates, [momentum] * len(self.peaks)


def anneal(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1), as torch's OneCycleLR computes it."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


class LRSchedule:
    """Sets the optimizer's rates for where the run is; the loop tells it after each
    optimizer step and after each epoch's validation."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rates_at: RatesAt | None,
        interval: str = "step",  # what rates_at's position counts: "step" | "epoch"
        plateau: ReduceLROnPlateau | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.rates_at = rates_at
        self.interval = interval
        self.plateau = plateau
        # what a cycled momentum sets, decided once for all groups as torch's OneCycleLR
        # does: Adam's first beta, else "momentum" (optimizer=muon: Muon's, its defaults')
        self.momentum_is_beta1 = "betas" in optimizer.defaults
        self.go_to(0, 0)

    def go_to(self, global_step: int, epoch: int) -> None:
        """The rates for optimizer step ``global_step`` + 1, in the epoch after ``epoch``."""
        if self.rates_at is None:
            return
        rates, momenta = self.rates_at(global_step if self.interval == "step" else epoch)
        for index, (group, rate) in enumerate(zip(self.optimizer.param_groups, rates, strict=True)):
            group["lr"] = rate
            if momenta is not None and self.momentum_is_beta1:
                group["betas"] = (momenta[index], *group["betas"][1:])
            elif momenta is not None:
                group["momentum"] = momenta[index]

    def peak_rate(self, first_step: int, last_step: int) -> float | None:
        """The first group's highest rate over optimizer steps first_step+1..last_step, or
        None where the rate stays as it is within an epoch (per-epoch, plateau, none)."""
        if self.rates_at is None or self.interval != "step" or last_step <= first_step:
            return None
        return max(self.rates_at(step)[0][0] for step in range(first_step, last_step))

    def after_optimizer_step(self, global_step: int) -> None:
        if self.interval == "step":
            self.go_to(global_step, 0)

    def after_epoch(self, epoch: int, val_acc: float) -> None:
        if self.plateau is not None:
            self.plateau.step(val_acc)
        elif self.interval == "epoch":
            self.go_to(0, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.plateau is None else self.plateau.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A plateau's history; any other schedule's saved state (an older version's torch
        scheduler) is not needed: ``go_to`` computes the rate from the counters."""
        if self.plateau is not None:
            self.plateau.load_state_dict(state)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    config: SchedulerConfig,
    epochs: int,
    steps_per_epoch: int,
) -> LRSchedule:
    peaks = [group["lr"] for group in optimizer.param_groups]  # muon: two peaks
    if isinstance(config, CosineConfig):
        per_step = config.interval == "step"
        total = epochs * steps_per_epoch if per_step else epochs
        warmup = round(config.warmup_epochs * (steps_per_epoch if per_step else 1))
        warmup = min(warmup, total - 1)
        return LRSchedule(
            optimizer,
            scaled(peaks, WarmupCosine(total, warmup, config.eta_min / peaks[0])),
            config.interval,
        )
    if isinstance(config, StepConfig):
        return LRSchedule(
            optimizer,
            scaled(peaks, lambda epoch: config.gamma ** (epoch // config.step_size)),
            "epoch",
        )
    if isinstance(config, OneCycleConfig):
        return LRSchedule(optimizer, OneCycle(peaks, epochs * steps_per_epoch, config), "step")
    if isinstance(config, PlateauConfig):
        plateau = ReduceLROnPlateau(
            optimizer,
            mode="max",  # validation accuracy: higher is better
            factor=config.factor,
            patience=config.patience,
            threshold=config.threshold,
            threshold_mode="abs",  # accuracy points, not a fraction of the accuracy
            min_lr=config.min_lr,
        )
        return LRSchedule(optimizer, None, "epoch", plateau)
    return LRSchedule(optimizer, None)  # scheduler=none: constant LR


def scaled(peaks: list[float], factor: Callable[[int], float]) -> RatesAt:
    """Every group's peak rate times ``factor`` at the position (LambdaLR's arithmetic)."""
    return lambda position: ([peak * factor(position) for peak in peaks], None)
