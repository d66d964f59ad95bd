"""The run's state in one place: what a checkpoint holds, saved and restored together.

Model, optimizer, schedule, GradScaler, the weight average, the data stream's position,
every random state, the counters and a mid-epoch's running sums go through one
``state_dict()`` and one ``load_state_dict()``, so a resume cannot forget a piece. With
several processes, the last three are each process's own, and the checkpoint holds
them all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from stable_cnn.models.ema import WeightEMA
from stable_cnn.state.checkpoint import load_model_weights
from stable_cnn.state.progress import EpochProgress
from stable_cnn.state.record import CheckpointRecord
from stable_cnn.state.resume import restore_rng, rng_state
from stable_cnn.system.distributed import ALONE, World
from stable_cnn.system.hardware import Runtime


class Saveable(Protocol):
    """What the state needs of a part it saves and restores but does not know (the
    data stream's position)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Schedule(Saveable, Protocol):
    """The learning-rate schedule (training.schedulers.LRSchedule): its rate is set from
    the counters, and only a plateau's history is saved."""

    def go_to(self, global_step: int, epoch: int) -> None: ...

    def peak_rate(self, first_step: int, last_step: int) -> float | None: ...


@dataclass
class Counters:
    """Where the run stands, and what its monitor (trainer.monitor) has seen."""

    epoch: int = 0  # completed epochs
    global_step: int = 0
    best_val_acc: float = -1.0  # best.pt's validation accuracy
    best_epoch: int = 0  # best.pt's epoch
    best_value: float | None = None  # best.pt's value of the monitor
    # early stopping's reference: the last value better than the one before by more
    # than trainer.early_stopping_min_delta, and its epoch
    patience_value: float | None = None
    patience_epoch: int = 0
    # save_top_k > 1: the checkpoints kept, best first: {"epoch", "value", "file"}
    kept: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.best_epoch > 0 and self.best_value is None:  # written before monitors: val_acc
            self.best_value = self.best_val_acc
        if self.best_epoch > 0 and self.patience_value is None:
            self.patience_value, self.patience_epoch = self.best_val_acc, self.best_epoch


@dataclass
class RunState:
    model: nn.Module  # the plain model (not the compiled wrapper): its keys have no prefix
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    data: Saveable  # the training batches: TensorBatches or ShuffledLoader (their position)
    runtime: Runtime
    record: CheckpointRecord  # what every checkpoint says about the run
    ema: WeightEMA | None = None  # the weight average (ema=on)
    counters: Counters = field(default_factory=Counters)
    progress: EpochProgress | None = None  # the running sums of an unfinished epoch
    world: World = ALONE  # the processes training together
    # the experiment stores' own runs (logger=mlflow, wandb): name -> run id, so that a
    # resume continues them
    tracker_runs: dict[str, str] = field(default_factory=dict)

    def own_state(self) -> dict[str, Any]:
        """What differs between processes: the data position (and augmentation stream),
        every random state, and the unfinished epoch's sums of its own batches."""
        return {
            "progress": None if self.progress is None else self.progress.state_dict(),
            "data": self.data.state_dict(),
            "rng": rng_state(self.runtime.device),
        }

    def state_dict(self) -> dict[str, Any]:
        """The whole run's state. With several processes, a collective: every process
        calls it at the same step, and rank 0's copy holds the others' own states."""
        processes = self.world.gather(self.own_state())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "counters": asdict(self.counters),
            **processes[0],
            "other_processes": processes[1:],  # ranks 1, 2, ...
            "tracker_runs": dict(self.tracker_runs),
            **self.record.as_state(),
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint (``path`` names it in errors)."""
        load_model_weights(self.model, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # the same config: the checkpoint has its average
            self.ema.load_state_dict(state["ema"])
        self.counters = Counters(**state["counters"])
        self.tracker_runs = dict(state.get("tracker_runs") or {})  # none before logger=mlflow
        self.schedule.go_to(self.counters.global_step, self.counters.epoch)
        own = state if self.world.rank == 0 else state["other_processes"][self.world.rank - 1]
        self.data.load_state_dict(own["data"])
        restore_rng(own["rng"], self.runtime.device)
        progress = own["progress"]
        device = self.runtime.device
        self.progress = None if progress is None else EpochProgress.from_state(progress, device)

    def where(self) -> str:
        """Where a resumed run continues, for the log."""
        if self.progress is not None:
            return f"mid-epoch {self.counters.epoch + 1}"
        return f"after epoch {self.counters.epoch}"
