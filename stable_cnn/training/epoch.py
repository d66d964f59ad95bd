"""One epoch of training and one pass of evaluation (the step itself is in step.py).

Loss, accuracy, norms and the counts of skipped steps accumulate on the device; the
host reads them only at log intervals and at the end of the epoch, so a GPU never waits
for Python between steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from stable_cnn.errors import TrainingDiverged
from stable_cnn.models.ema import WeightEMA
from stable_cnn.state.progress import SLOT, EpochProgress, across_processes
from stable_cnn.system.distributed import ALONE, World
from stable_cnn.system.hardware import Runtime
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


def train_one_epoch(
    train_step: TrainStep,
    batches: Iterable,
    schedule: LRSchedule,
    global_step: int,
    log_every_n_steps: int,
    log_step: StepLogger,
    progress_label: str = "",
    progress_bar: bool = True,
    progress: EpochProgress | None = None,
    stop_requested: Callable[[], str] = lambda: "",
    on_nonfinite: str = "skip",
    max_consecutive_nonfinite: int = 10,
    ema: WeightEMA | None = None,
    world: World = ALONE,
    accumulate: int = 1,
) -> tuple[EpochStats, EpochProgress]:
    """Train over ``batches`` with ``train_step``; continue ``progress`` when resuming
    mid-epoch.

    The host reads the device only every ``log_every_n_steps`` steps and at the end of the
    epoch. The epoch ends early, after the current step, when ``stop_requested()`` names a
    reason (a signal); with ``on_nonfinite="stop"`` at the first NaN/Inf loss or gradient
    (which costs one host read per step); with ``on_nonfinite="skip"`` once a check (at
    each log interval and the epoch's end) finds ``max_consecutive_nonfinite`` skipped
    steps in a row. ``ema``, if given, is updated after every step (outside the step, so
    a captured step keeps its graph).

    With ``accumulate`` > 1, each optimizer step accumulates the gradients of that many
    batches (the epoch's last step those that are left); steps, the schedule, the
    weight average, log intervals and stops count optimizer steps.

    With several processes (``world``) every decision is taken on values they share, at
    the same step: the sums are gathered at log intervals and the epoch's end, and a
    stop request (a signal may reach one process only) is agreed at log intervals,
    where the host reads the device anyway; a lone process checks it every step.
    """
    train_step.model.train()
    runtime, optimizer, scaler = train_step.runtime, train_step.optimizer, train_step.scaler
    if progress is None:
        progress = EpochProgress.start(runtime.device)
        progress.start_lr = current_lr(optimizer)
    stop_reason, signalled = "", False
    bar = tqdm(batches, desc=progress_label, leave=False, disable=None if progress_bar else True)
    started = time.perf_counter()
    for micro_batches in chunked(bar, accumulate):
        on_device = to_device(micro_batches, runtime)
        if accumulate == 1:
            step = train_step(*on_device[0], progress)  # a captured step replays here
        else:
            step = train_step.accumulated(on_device, progress)
        if ema is not None:
            ema.update()
        schedule.after_optimizer_step()
        global_step += 1

        if on_nonfinite == "stop":  # the one policy that reads the device every step
            stop_reason = first_nonfinite(step, scaler.is_enabled(), global_step)
        at_interval = global_step % log_every_n_steps == 0
        if at_interval:
            stop_reason = stop_reason or log_interval(
                progress,
                step,
                optimizer,
                scaler,
                global_step,
                log_step,
                bar,
                max_consecutive_nonfinite,
                world,
            )
        if (at_interval or not world.distributed) and not stop_reason:
            stop_reason = world.agree_on_reason(stop_requested())
            signalled = bool(stop_reason)
        if stop_reason:
            break
    bar.close()
    values = progress.read(world)  # also waits for the device: the time below is the GPU's
    progress.seconds += time.perf_counter() - started
    if not stop_reason and values["longest_nonfinite_run"] >= max_consecutive_nonfinite:
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
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    global_step: int,
    log_step: StepLogger,
    bar: tqdm,
    max_consecutive_nonfinite: int,
    world: World = ALONE,
) -> str:
    """Log the window's mean loss and this step's norms (one host read, two under fp16);
    return a reason to stop if the skip limit was reached, else ''."""
    values = across_processes(progress.values, world)
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
        log_step(global_step, scalars)
        bar.set_postfix(loss=f"{scalars['loss/train']:.4f}", refresh=False)
    if longest >= max_consecutive_nonfinite:
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
