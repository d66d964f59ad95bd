"""One epoch of training and one pass of evaluation (the step itself is in step.py).

Loss, accuracy, norms and the counts of skipped steps accumulate on the device; the
host reads them only at log intervals and at the end of the epoch, so a GPU never waits
for Python between steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from stable_cnn.errors import TrainingDiverged
from stable_cnn.models.ema import WeightEMA
from stable_cnn.state.progress import SLOT, EpochProgress, across_processes
from stable_cnn.system.distributed import ALONE, World
from stable_cnn.system.hardware import Runtime
from stable_cnn.training.captured_step import GraphedTrainStep
from stable_cnn.training.profiling import ProfiledStep
from stable_cnn.training.schedulers import LRSchedule
from stable_cnn.training.step import StepOutcome, TrainStep

StepLogger = Callable[[int, dict[str, float]], None]


@dataclass
class EpochStats:
    loss: float  # mean training loss over the epoch
    accuracy: float  # training accuracy on augmented batches, percent
    grad_norm: float  # mean gradient L2 norm before clipping
    images: int
    seconds: float
    global_step: int  # optimizer steps taken so far in the run
    grad_norm_clipped: float = 0.0  # mean gradient L2 norm after clipping
    clip_fraction: float = 0.0  # fraction of applied steps whose gradients were clipped
    loss_spikes: int = 0  # steps whose loss exceeded loss_spike_factor x the running mean
    nonfinite_steps: int = 0
    amp_skipped_steps: int = 0
    stop_reason: str = ""  # why the epoch ended early ("" = it completed)
    signalled: bool = False  # it ended for a signal (to any process), not for NaN/Inf

    @property
    def completed(self) -> bool:
        return not self.stop_reason

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def ensure_finite(what: str, value: float, global_step: int) -> None:
    """Stop a diverged run with one line, rather than train on NaN weights."""
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"{what} became {value} by step {global_step}: lower optimizer.lr, "
            f"keep clipping on (clipping=norm), or try amp=off"
        )


@dataclass
class EpochLoop:
    """What an epoch trains with: the step (forward, backward, clip, optimizer step), the
    batches, the schedule it advances, where the logged values go, and where there are
    any the weight average, the other processes and the check for a signal."""

    train_step: TrainStep | GraphedTrainStep | ProfiledStep
    batches: Iterable
    schedule: LRSchedule
    log_step: StepLogger = field(default=lambda step, scalars: None)
    ema: WeightEMA | None = None
    world: World = ALONE
    stop_requested: Callable[[], str] = field(default=lambda: "")  # a signal's name, or ""


@dataclass(frozen=True)
class EpochSettings:
    """How an epoch runs (the trainer.* keys of the same names)."""

    log_every_n_steps: int = 50  # the host reads the device this often, and at the end
    on_nonfinite: str = "skip"  # skip: drop a NaN/Inf step on the device; stop: end there
    max_consecutive_nonfinite: int = 10  # skip: this many in a row end the epoch
    accumulate: int = 1  # batches whose gradients make one optimizer step
    progress_bar: bool = False
    label: str = ""  # the progress bar's, e.g. "epoch 3/10"


def train_one_epoch(
    loop: EpochLoop,
    settings: EpochSettings,
    global_step: int,
    progress: EpochProgress | None = None,
) -> tuple[EpochStats, EpochProgress]:
    """Train over ``loop.batches`` from optimizer step ``global_step``, continuing
    ``progress`` when resuming mid-epoch; returns the epoch's stats and its running sums.
    The epoch may end early, after a step: ``EpochStats.stop_reason`` says why."""
    train_step, world = loop.train_step, loop.world
    train_step.model.train()
    runtime, optimizer, scaler = train_step.runtime, train_step.optimizer, train_step.scaler
    if progress is None:
        progress = EpochProgress.start(runtime.device)
        progress.start_lr = current_lr(optimizer)
    stop_reason, signalled = "", False
    bar = tqdm(
        loop.batches,
        desc=settings.label,
        leave=False,
        disable=None if settings.progress_bar else True,
    )
    started = time.perf_counter()
    for micro_batches in chunked(bar, settings.accumulate):
        step = train_step.run(to_device(micro_batches, runtime), progress)  # a captured one replays
        global_step += 1
        if loop.ema is not None:
            loop.ema.update(global_step)  # its decay warms up with the run's steps
        loop.schedule.after_optimizer_step(global_step)

        if settings.on_nonfinite == "stop":  # the one policy that reads the device every step
            stop_reason = first_nonfinite(step, scaler.is_enabled(), global_step)
        at_interval = global_step % settings.log_every_n_steps == 0
        if at_interval:  # the host reads the device here (and at the end), no more often
            stop_reason = stop_reason or log_interval(
                progress, step, loop, settings, global_step, bar
            )
        # several processes agree on a signal where they read anyway; one checks each step
        if (at_interval or not world.distributed) and not stop_reason:
            stop_reason = world.agree_on_reason(loop.stop_requested())
            signalled = bool(stop_reason)
        if stop_reason:
            break
    bar.close()
    values = progress.read(world)  # also waits for the device: the time below is the GPU's
    progress.seconds += time.perf_counter() - started
    # on_nonfinite=skip: too many skipped steps in a row, seen at the epoch's end
    if not stop_reason and values["longest_nonfinite_run"] >= settings.max_consecutive_nonfinite:
        stop_reason = too_many_nonfinite(values, global_step)
    stats = epoch_stats(values, progress.seconds, global_step, stop_reason)
    stats.signalled = signalled
    return stats, progress


def to_device(
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A step's batches on the run's device, images in its memory layout (no host wait)."""
    return [
        (
            images.to(runtime.device, non_blocking=True, memory_format=runtime.memory_format),
            labels.to(runtime.device, non_blocking=True),
        )
        for images, labels in micro_batches
    ]


def chunked(batches: Iterable, size: int) -> Iterator[list]:
    """``batches`` in lists of ``size`` (the last one shorter when they do not divide)."""
    chunk: list = []
    for batch in batches:
        chunk.append(batch)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first parameter group's learning rate as a float (it may be a tensor)."""
    return float(optimizer.param_groups[0]["lr"])


def first_nonfinite(step: StepOutcome, fp16: bool, global_step: int) -> str:
    """With on_nonfinite=stop: the reason to stop at this step, or ''. One host read."""
    loss_finite, grads_finite = torch.stack([step.loss_finite, step.grads_finite]).tolist()
    if loss_finite and (grads_finite or fp16):  # an fp16 overflow is the scaler's business
        return ""
    return f"non-finite {'gradient' if loss_finite else 'loss'} at step {global_step}"


def too_many_nonfinite(values: dict[str, float], global_step: int) -> str:
    longest = values["longest_nonfinite_run"]
    return f"{longest:.0f} non-finite steps in a row (by step {global_step})"


def log_interval(
    progress: EpochProgress,
    step: StepOutcome,
    loop: EpochLoop,
    settings: EpochSettings,
    global_step: int,
    bar: tqdm,
) -> str:
    """Log the window's mean loss and this step's norms (one host read, two under fp16);
    return a reason to stop if the skip limit was reached, else ''."""
    optimizer, scaler = loop.train_step.optimizer, loop.train_step.scaler
    values = across_processes(progress.values, loop.world)
    window_loss, window_steps, grad_norm, grad_norm_clipped, longest = torch.stack(
        [
            values[SLOT["window_loss"]],
            values[SLOT["window_steps"]],
            step.grad_norm.float(),
            step.grad_norm_clipped.float(),
            values[SLOT["longest_nonfinite_run"]],
        ]
    ).tolist()
    progress.values[SLOT["window_loss"]] = 0.0
    progress.values[SLOT["window_steps"]] = 0.0
    if window_steps:
        scalars = {
            "loss/train": window_loss / window_steps,
            "stability/lr": current_lr(optimizer),
            "stability/grad_norm": grad_norm,
            "stability/grad_norm_clipped": grad_norm_clipped,
        }
        if scaler.is_enabled():
            scalars["stability/amp_scale"] = scaler.get_scale()
        loop.log_step(global_step, scalars)
        bar.set_postfix(loss=f"{scalars['loss/train']:.4f}", refresh=False)
    if longest >= settings.max_consecutive_nonfinite:
        return too_many_nonfinite({"longest_nonfinite_run": longest}, global_step)
    return ""


def epoch_stats(
    values: dict[str, float], seconds: float, global_step: int, stop_reason: str
) -> EpochStats:
    images, steps = max(values["images"], 1), max(values["steps"], 1)
    return EpochStats(
        loss=values["loss_sum"] / images,
        accuracy=100.0 * values["correct"] / images,
        grad_norm=values["grad_norm_sum"] / steps,
        images=int(values["images"]),
        seconds=seconds,
        global_step=global_step,
        grad_norm_clipped=values["grad_norm_clipped_sum"] / steps,
        clip_fraction=values["clipped_steps"] / steps,
        loss_spikes=int(values["loss_spikes"]),
        nonfinite_steps=int(values["nonfinite_steps"]),
        amp_skipped_steps=int(values["amp_skipped_steps"]),
        stop_reason=stop_reason,
    )
