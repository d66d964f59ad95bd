"""The running values of one training epoch, in one tensor on the device: a step adds to
them without the host reading anything, the log reads them at intervals and at the
epoch's end, and a mid-epoch checkpoint keeps them so that a resumed epoch reports the
numbers an uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stable_cnn.system.distributed import ALONE, World


@dataclass
class StepOutcome:
    """What one step did; every field is a device tensor (reading one syncs a GPU)."""

    grad_norm: torch.Tensor  # total L2 norm before clipping
    grad_norm_clipped: torch.Tensor  # after clipping
    loss_finite: torch.Tensor  # bool
    grads_finite: torch.Tensor  # bool

    @property
    def applied(self) -> torch.Tensor:
        """The weights moved: loss and gradients were finite."""
        return self.loss_finite & self.grads_finite


# Loss-spike detection: the running mean follows the batch loss with this weight per step
# (an exponential mean over about 1 / LOSS_MEAN_RATE = 50 steps), and counts spikes only
# after this many steps of an epoch.
LOSS_MEAN_RATE = 0.02
SPIKE_WARMUP_STEPS = 20

# The epoch's running values, one slot each in EpochProgress.values.
SLOTS = (
    "loss_sum",
    "correct",
    "images",
    "steps",
    "grad_norm_sum",
    "grad_norm_clipped_sum",
    "clipped_steps",
    "loss_spikes",  # the sums above count applied steps only
    "nonfinite_steps",  # skipped for a NaN/Inf loss or gradient
    "amp_skipped_steps",  # fp16 steps the GradScaler skipped (gradient overflow: normal)
    "window_loss",
    "window_steps",  # since the last log interval
    "loss_mean",  # running (exponential) mean of the batch loss, for spikes
    "consecutive_nonfinite",
    "longest_nonfinite_run",
)
SLOT = {name: index for index, name in enumerate(SLOTS)}
APPLIED_SUMS = slice(0, SLOT["loss_spikes"] + 1)  # added to only when the step applied
# With several processes, these depend on each process's own batches and add up over
# them; the others count steps and gradients, which every process shares.
PER_PROCESS = [
    SLOT[name]
    for name in ("loss_sum", "correct", "images", "loss_spikes", "window_loss", "window_steps")
]


def across_processes(values: torch.Tensor, world: World) -> torch.Tensor:
    """The epoch's values for the whole run (one gather; ``values`` itself for one process)."""
    if not world.distributed:
        return values
    rows = world.rows(values)
    combined = rows[0].clone()
    combined[PER_PROCESS] = rows[:, PER_PROCESS].sum(0)
    return combined


@dataclass
class EpochProgress:
    """The running values of one epoch, in one tensor on the device: a step updates them
    without the host reading anything. Saved in mid-epoch checkpoints, so that a resumed
    epoch reports the same numbers as an uninterrupted one."""

    values: torch.Tensor  # float32 (len(SLOTS),), see SLOTS
    seconds: float = 0.0
    start_lr: float = 0.0  # the learning rate the epoch started with

    @classmethod
    def start(cls, device: torch.device) -> EpochProgress:
        return cls(torch.zeros(len(SLOTS), device=device))

    def record(
        self,
        step: StepOutcome,
        loss: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        loss_spike_factor: float,
        fp16_overflow_is_normal: bool,
    ) -> None:
        """Add one step; every operation stays on the device."""
        values, applied = self.values, step.applied
        batch_loss = loss.detach().float()
        steps, loss_mean = values[SLOT["steps"]], values[SLOT["loss_mean"]]
        spike = (steps >= SPIKE_WARMUP_STEPS) & (batch_loss > loss_spike_factor * loss_mean)
        correct = (logits.argmax(1) == labels).sum()
        count = torch.full_like(batch_loss, labels.shape[0])
        increments = torch.stack(
            [
                batch_loss * count,
                correct.float(),
                count,
                torch.ones_like(batch_loss),
                step.grad_norm.float(),
                step.grad_norm_clipped.float(),
                (step.grad_norm_clipped < step.grad_norm).float(),
                spike.float(),
            ]
        )
        moved = torch.lerp(loss_mean, batch_loss, LOSS_MEAN_RATE)
        new_mean = torch.where(steps == 0, batch_loss, moved)
        values[APPLIED_SUMS] += torch.where(applied, increments, 0.0)
        values[SLOT["window_loss"]] += torch.where(applied, batch_loss, 0.0)
        values[SLOT["window_steps"]] += applied.float()
        values[SLOT["loss_mean"]] = torch.where(applied, new_mean, loss_mean)
        overflow = ~applied & step.loss_finite
        if not fp16_overflow_is_normal:
            overflow = torch.zeros_like(applied)
        nonfinite = (~applied & ~overflow).float()
        values[SLOT["nonfinite_steps"]] += nonfinite
        values[SLOT["amp_skipped_steps"]] += overflow.float()
        consecutive = torch.where(applied, 0.0, values[SLOT["consecutive_nonfinite"]] + nonfinite)
        values[SLOT["consecutive_nonfinite"]] = consecutive
        values[SLOT["longest_nonfinite_run"]] = torch.maximum(
            values[SLOT["longest_nonfinite_run"]], consecutive
        )

    def read(self, world: World = ALONE) -> dict[str, float]:
        """Every value for the whole run, in one host read."""
        return dict(zip(SLOTS, across_processes(self.values, world).tolist(), strict=True))

    def state_dict(self) -> dict:
        return {"values": self.values.cpu(), "seconds": self.seconds, "start_lr": self.start_lr}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> EpochProgress:
        return cls(state["values"].to(device), state["seconds"], state["start_lr"])
