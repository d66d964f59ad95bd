"""Learning-rate schedules (conf/scheduler/), each stepped with its own cadence.

Per-step schedules advance after every optimizer step; per-epoch ones after each
epoch's validation; ReduceLROnPlateau is given the validation accuracy (mode max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau, StepLR

from stable_cnn.config import (
    CosineConfig,
    OneCycleConfig,
    PlateauConfig,
    SchedulerConfig,
    StepConfig,
)


@dataclass
class WarmupCosine:
    """LR factor at step t: linear warmup over ``warmup`` steps, then cosine from 1 to
    ``min_factor`` over the remaining ``total - warmup``. With no warmup this is exactly
    CosineAnnealingLR(T_max=total). A class, not a lambda, so it pickles."""

    total: int
    warmup: int
    min_factor: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(step - self.warmup, self.total - self.warmup) / (self.total - self.warmup)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class LRSchedule:
    """A torch scheduler plus when to step it: the loop calls both hooks, one acts."""

    def __init__(self, scheduler: LRScheduler | ReduceLROnPlateau | None, interval: str) -> None:
        self.scheduler = scheduler
        self.interval = interval  # "step" | "epoch"

    def after_optimizer_step(self) -> None:
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()

    def after_epoch(self, val_acc: float) -> None:
        if self.scheduler is None or self.interval != "epoch":
            return
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(val_acc)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {} if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    config: SchedulerConfig,
    epochs: int,
    steps_per_epoch: int,
) -> LRSchedule:
    peak_lr = optimizer.param_groups[0]["lr"]
    if isinstance(config, CosineConfig):
        per_step = config.interval == "step"
        total = epochs * steps_per_epoch if per_step else epochs
        warmup = round(config.warmup_epochs * (steps_per_epoch if per_step else 1))
        warmup = min(warmup, total - 1)
        factor = WarmupCosine(total, warmup, config.eta_min / peak_lr)
        return LRSchedule(LambdaLR(optimizer, factor), config.interval)
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
        return LRSchedule(plateau, "epoch")
    if isinstance(config, StepConfig):
        return LRSchedule(StepLR(optimizer, config.step_size, config.gamma), "epoch")
    if isinstance(config, OneCycleConfig):
        one_cycle = OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],  # muon: two peaks
            total_steps=epochs * steps_per_epoch,
            pct_start=config.pct_start,
            div_factor=config.div_factor,
            final_div_factor=config.final_div_factor,
            cycle_momentum=config.cycle_momentum,
            base_momentum=config.base_momentum,
            max_momentum=config.max_momentum,
        )
        return LRSchedule(one_cycle, "step")
    return LRSchedule(None, "epoch")  # scheduler=none: constant LR
