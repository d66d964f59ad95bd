"""One epoch of training, one pass of evaluation, and the optimizer step between them.

The step order is fixed (nanoGPT's): scale -> backward -> unscale -> clip -> step ->
update -> zero_grad. Clipping therefore sees real gradient units, and a single
GradScaler lives for the whole run (the tutorial made a new one every epoch, which
threw away its calibrated scale). Loss and accuracy accumulate on the device; the
host reads them only at log intervals and at the end of the epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from stable_cnn.config import ClippingConfig
from stable_cnn.errors import UserError
from stable_cnn.hardware import Precision, Runtime
from stable_cnn.schedulers import LRSchedule

StepLogger = Callable[[int, dict[str, float]], None]
# Loss-spike detection: the running mean follows the batch loss with this weight per step
# (an exponential mean over about 1 / LOSS_MEAN_RATE = 50 steps), and counts spikes only
# after this many steps of an epoch.
LOSS_MEAN_RATE = 0.02
SPIKE_WARMUP_STEPS = 20


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class EpochProgress:
    """Running sums of one epoch, on the device; saved in mid-epoch checkpoints so that a
    resumed epoch reports the same numbers as an uninterrupted one."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    grad_norm_sum: torch.Tensor  # before clipping
    grad_norm_clipped_sum: torch.Tensor  # after clipping
    clipped_steps: torch.Tensor  # steps whose gradients clipping changed
    loss_spikes: torch.Tensor  # steps whose loss exceeded loss_spike_factor x the running mean
    loss_mean: torch.Tensor  # running (exponential) mean of the batch loss
    images: int = 0
    steps: int = 0
    seconds: float = 0.0
    nonfinite_steps: int = 0  # steps skipped for a NaN/Inf loss or gradient (fp32/bf16)
    amp_skipped_steps: int = 0  # fp16 steps the GradScaler skipped (gradient overflow)
    start_lr: float = 0.0  # the learning rate the epoch started with

    TENSORS = ("loss_sum", "correct", "grad_norm_sum", "grad_norm_clipped_sum", "clipped_steps",
               "loss_spikes", "loss_mean")  # fmt: skip

    @classmethod
    def start(cls, device: torch.device) -> EpochProgress:
        return cls(*(torch.zeros((), device=device) for _ in cls.TENSORS))

    def state_dict(self) -> dict:
        return {
            **{name: getattr(self, name).cpu() for name in self.TENSORS},
            "images": self.images,
            "steps": self.steps,
            "seconds": self.seconds,
            "nonfinite_steps": self.nonfinite_steps,
            "amp_skipped_steps": self.amp_skipped_steps,
            "start_lr": self.start_lr,
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> EpochProgress:
        tensors = [state.pop(key).to(device) for key in cls.TENSORS]
        return cls(*tensors, **state)


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

    @property
    def completed(self) -> bool:
        return not self.stop_reason

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


@dataclass
class EvalStats:
    loss: float
    accuracy: float  # percent
    images: int
    confusion: torch.Tensor  # (classes, classes) counts on the CPU: rows true, columns predicted


def ensure_finite(what: str, value: float, global_step: int) -> None:
    """Stop a diverged run with one line, rather than train on NaN weights."""
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"{what} became {value} by step {global_step}: lower optimizer.lr, "
            f"keep clipping on (clipping=norm), or try amp=off"
        )


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def clip_gradients(
    parameters: list[nn.Parameter], clipping: ClippingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip in place as configured; return the total L2 norm before and after clipping
    (device tensors: reading them would sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if clipping.name == "norm":
        torch.nn.utils.clip_grads_with_norm_(parameters, clipping.max_norm, norm)
        # The factor clip_grads_with_norm_ applied, so the new norm costs no second pass.
        scale = (clipping.max_norm / (norm + 1e-6)).clamp(max=1.0)
        return norm, norm * scale
    if clipping.name == "value":
        torch.nn.utils.clip_grad_value_(parameters, clipping.max_value)
        return norm, torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm, norm


@dataclass
class StepOutcome:
    grad_norm: torch.Tensor  # total L2 norm before clipping, on the device
    grad_norm_clipped: torch.Tensor  # after clipping
    loss_finite: bool
    grads_finite: bool

    @property
    def applied(self) -> bool:
        return self.loss_finite and self.grads_finite


def optimizer_step(
    loss: torch.Tensor,
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clipping: ClippingConfig,
) -> StepOutcome:
    """Backward, clip the unscaled gradients, step; a step whose loss or gradients are
    NaN/Inf is skipped (the weights stay as they were)."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm, grad_norm_clipped = clip_gradients(parameters, clipping)
    # One host read per step: skipping must be decided before the update. (Under fp16 the
    # GradScaler reads the same flag itself, and skips and lowers its scale on its own.)
    loss_finite, grads_finite = torch.stack([loss.isfinite(), grad_norm.isfinite()]).tolist()
    if (loss_finite and grads_finite) or scaler.is_enabled():
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(grad_norm, grad_norm_clipped, loss_finite, grads_finite)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: LRSchedule,
    clipping: ClippingConfig,
    runtime: Runtime,
    global_step: int,
    log_every_n_steps: int,
    log_step: StepLogger,
    progress_label: str = "",
    progress_bar: bool = True,
    progress: EpochProgress | None = None,
    stop_requested: Callable[[], str] = lambda: "",
    on_nonfinite: str = "skip",
    max_consecutive_nonfinite: int = 10,
    loss_spike_factor: float = 2.0,
) -> tuple[EpochStats, EpochProgress]:
    """Train over ``batches``; continue ``progress`` when resuming mid-epoch.

    Ends the epoch early, after the current step, when ``stop_requested()`` names a reason
    (a signal), or on a NaN/Inf loss or gradient with ``on_nonfinite="stop"``, or after
    ``max_consecutive_nonfinite`` skipped steps in a row with ``on_nonfinite="skip"``.
    A step whose loss exceeds ``loss_spike_factor`` times the running mean loss (over about
    the last 1 / LOSS_MEAN_RATE steps) counts as a loss spike.
    """
    model.train()
    device = runtime.device
    parameters = [p for p in model.parameters() if p.requires_grad]
    if progress is None:
        progress = EpochProgress.start(device)
        progress.start_lr = optimizer.param_groups[0]["lr"]
    sums = progress
    # BatchNorm updates its running statistics in the forward pass, before a step can be
    # judged; a skipped step puts them back, so one NaN batch cannot poison them.
    norm_buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    for b in m.buffers()]  # fmt: skip
    window_loss, window_steps, consecutive_nonfinite = torch.zeros((), device=device), 0, 0
    stop_reason = ""
    bar = tqdm(batches, desc=progress_label, leave=False, disable=None if progress_bar else True)
    started = time.perf_counter()
    for images, labels in bar:
        images = images.to(device, non_blocking=True, memory_format=runtime.memory_format)
        labels = labels.to(device, non_blocking=True)
        saved_buffers = [b.clone() for b in norm_buffers]
        with autocast(device, runtime.precision):
            logits = model(images)
            loss = criterion(logits, labels)
        step = optimizer_step(loss, parameters, optimizer, scaler, clipping)
        if not step.applied:
            for buffer, saved in zip(norm_buffers, saved_buffers, strict=True):
                buffer.copy_(saved)
        schedule.after_optimizer_step()
        global_step += 1

        if step.applied:
            consecutive_nonfinite = 0
            batch_loss = loss.detach().float()
            sums.loss_sum += batch_loss * labels.shape[0]
            sums.correct += (logits.argmax(1) == labels).sum()
            sums.grad_norm_sum += step.grad_norm
            sums.grad_norm_clipped_sum += step.grad_norm_clipped
            sums.clipped_steps += step.grad_norm_clipped < step.grad_norm
            if sums.steps >= SPIKE_WARMUP_STEPS:  # the running mean needs a few steps first
                sums.loss_spikes += batch_loss > loss_spike_factor * sums.loss_mean
            sums.loss_mean = (
                batch_loss
                if sums.steps == 0
                else torch.lerp(sums.loss_mean, batch_loss, LOSS_MEAN_RATE)
            )
            sums.images += labels.shape[0]
            sums.steps += 1
            window_loss += batch_loss
            window_steps += 1
        elif scaler.is_enabled() and step.loss_finite:
            sums.amp_skipped_steps += 1  # fp16 overflow: the scaler lowers its scale, normal
        else:
            sums.nonfinite_steps += 1
            consecutive_nonfinite += 1
            what = "loss" if not step.loss_finite else "gradient"
            if on_nonfinite == "stop":
                stop_reason = f"non-finite {what} at step {global_step}"
            elif consecutive_nonfinite >= max_consecutive_nonfinite:
                stop_reason = (
                    f"{consecutive_nonfinite} non-finite steps in a row (step {global_step})"
                )
        if global_step % log_every_n_steps == 0 and window_steps:
            scalars = {
                "train/loss": window_loss.item() / window_steps,
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/grad_norm": step.grad_norm.item(),
                "train/grad_norm_clipped": step.grad_norm_clipped.item(),
            }
            if scaler.is_enabled():
                scalars["amp/scale"] = scaler.get_scale()
            log_step(global_step, scalars)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)
            window_loss.zero_()
            window_steps = 0
        stop_reason = stop_reason or stop_requested()
        if stop_reason:
            break
    bar.close()
    sums.seconds += time.perf_counter() - started
    images, steps = max(sums.images, 1), max(sums.steps, 1)
    stats = EpochStats(
        loss=sums.loss_sum.item() / images,
        accuracy=100.0 * sums.correct.item() / images,
        grad_norm=sums.grad_norm_sum.item() / steps,
        images=sums.images,
        seconds=sums.seconds,
        global_step=global_step,
        grad_norm_clipped=sums.grad_norm_clipped_sum.item() / steps,
        clip_fraction=sums.clipped_steps.item() / steps,
        loss_spikes=int(sums.loss_spikes.item()),
        nonfinite_steps=sums.nonfinite_steps,
        amp_skipped_steps=sums.amp_skipped_steps,
        stop_reason=stop_reason,
    )
    return stats, sums


def evaluate(
    model: nn.Module,
    batches: Iterable,
    runtime: Runtime,
) -> EvalStats:
    """Mean cross-entropy (no label smoothing, so runs compare) and accuracy in percent."""
    model.eval()
    device = runtime.device
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros((), device=device, dtype=torch.int64)  # sized by the first batch
    count = 0
    with torch.inference_mode():
        for images, labels in batches:
            images = images.to(device, non_blocking=True, memory_format=runtime.memory_format)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, runtime.precision):
                logits = model(images)
            loss_sum += criterion(logits.float(), labels)
            classes = logits.shape[1]
            pairs = labels * classes + logits.argmax(1)  # (true, predicted) as one index
            confusion = confusion + torch.bincount(pairs, minlength=classes * classes)
            count += labels.shape[0]
    confusion = confusion.view(classes, classes).cpu()
    correct = confusion.diagonal().sum().item()
    return EvalStats(loss_sum.item() / count, 100.0 * correct / count, count, confusion)
