"""What the run keeps and when it stops: one validation metric (trainer.monitor: val_acc,
val_loss, val_f1 or val_top5, of the weights the run tests) picks best.pt, the
``save_top_k`` checkpoints kept beside it, and the epoch that early stopping counts
from (Lightning's ModelCheckpoint and EarlyStopping, watching the same value).

Everything it decides goes into the run's Counters, so a resumed run keeps the same
best, the same kept files and the same patience.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from stable_cnn.config import TrainerConfig
from stable_cnn.errors import ConfigError
from stable_cnn.state.checkpoint import save_checkpoint_copy
from stable_cnn.state.run_state import Counters
from stable_cnn.training.evaluation import TOP_K, EvalStats

log = logging.getLogger("stable_cnn")

# The kept checkpoints' names: epoch and value, no "=" (Hydra would split an override there).
KEPT_NAME = re.compile(r"epoch\d+-val_[a-z0-9]+\d+\.\d+\.pt")


@dataclass
class Verdict:
    """What one epoch's value means for the run."""

    value: float
    improved: bool  # the best so far: it becomes best.pt
    kept_file: str | None = None  # save_top_k > 1: saved under this name, among the k best
    pushed_out: list[str] = field(default_factory=list)  # kept files it replaced
    stop: bool = False  # early stopping: the patience has run out


@dataclass(frozen=True)
class Monitor:
    name: str  # as metrics.jsonl names it
    mode: str  # max | min
    top_k: int = 1
    patience: int | None = None
    min_delta: float = 0.0
    stop_at_train_loss: float | None = None  # debug=overfit's goal
    epochs: int = 0  # the run's last epoch

    @classmethod
    def of(cls, trainer: TrainerConfig, num_classes: int) -> Monitor:
        """The trainer's monitor, for data of ``num_classes`` classes."""
        if trainer.monitor == "val_top5" and num_classes <= TOP_K:
            raise ConfigError(
                f"trainer.monitor=val_top5 needs more than {TOP_K} classes and this data "
                f"has {num_classes}: monitor val_acc, val_loss or val_f1"
            )
        return cls(
            trainer.monitor,
            trainer.monitor_direction,
            trainer.save_top_k,
            trainer.early_stopping_patience,
            trainer.early_stopping_min_delta,
            trainer.stop_at_train_loss,
            trainer.epochs,
        )

    def value(self, stats: EvalStats) -> float:
        if self.name == "val_loss":
            return stats.loss
        if self.name == "val_f1":
            return stats.macro_f1
        if self.name == "val_top5" and stats.top5 is not None:
            return stats.top5
        return stats.accuracy

    def better(self, value: float, than: float | None, by: float = 0.0) -> bool:
        if than is None:
            return True
        return value > than + by if self.mode == "max" else value < than - by

    def judge(self, counters: Counters, epoch: int, stats: EvalStats, train_loss: float) -> Verdict:
        """Record ``epoch``'s validation in ``counters`` and say what it means (and, with
        trainer.stop_at_train_loss, what its training loss does)."""
        value = self.value(stats)
        verdict = Verdict(value, improved=self.better(value, counters.best_value))
        if verdict.improved:
            counters.best_val_acc, counters.best_value = stats.accuracy, value
            counters.best_epoch = epoch
        if self.better(value, counters.patience_value, self.min_delta):
            counters.patience_value, counters.patience_epoch = value, epoch
        if self.top_k > 1:
            entry = {
                "epoch": epoch,
                "value": value,
                "file": f"epoch{epoch:03d}-{self.name}{value:.4f}.pt",
            }
            sign = -1 if self.mode == "max" else 1
            # best first; of equal values the earlier epoch, as best.pt keeps it
            ranked = sorted([*counters.kept, entry], key=lambda e: (sign * e["value"], e["epoch"]))
            counters.kept = ranked[: self.top_k]
            verdict.kept_file = entry["file"] if entry in counters.kept else None
            verdict.pushed_out = [e["file"] for e in ranked[self.top_k :]]
        if self.patience is not None and epoch - counters.patience_epoch >= self.patience:
            verdict.stop = True
            log.info(
                "early stopping: %s not better by more than %g for %d epochs (%.4g at epoch %d)",
                self.name,
                self.min_delta,
                self.patience,
                counters.patience_value,
                counters.patience_epoch,
            )
        verdict.stop = verdict.stop or self.reached_train_loss(epoch, train_loss)
        return verdict

    def reached_train_loss(self, epoch: int, train_loss: float) -> bool:
        """Whether the training loss is below trainer.stop_at_train_loss; says so, and
        says at the last epoch that it never got there."""
        goal = self.stop_at_train_loss
        if goal is None:
            return False
        if train_loss < goal:
            log.info(
                "training loss %.4f < %g at epoch %d (trainer.stop_at_train_loss): the model "
                "fits these images; stopping",
                train_loss,
                goal,
                epoch,
            )
            return True
        if epoch == self.epochs:
            log.warning(
                "training loss %.4f after %d epochs, not below %g (trainer.stop_at_train_loss): "
                "the model did not fit these images; check the labels, the model's output "
                "(one logit per class) and the learning rate, or give it more epochs",
                train_loss,
                epoch,
                goal,
            )
        return False


def tidy_kept(folder: Path, counters: Counters) -> None:
    """Make the kept files what ``counters`` (a resumed last.pt's) says: a run killed
    between saving an epoch and removing what it pushed out left extra files, and one
    killed between best.pt and last.pt left best.pt ahead of the counters."""
    kept = [entry["file"] for entry in counters.kept]
    for path in folder.glob("epoch*-val_*.pt"):
        if KEPT_NAME.fullmatch(path.name) and path.name not in kept:
            path.unlink(missing_ok=True)
    best, first = folder / "best.pt", folder / kept[0] if kept else None
    if first is not None and first.is_file() and not (best.is_file() and best.samefile(first)):
        save_checkpoint_copy(first, best)
