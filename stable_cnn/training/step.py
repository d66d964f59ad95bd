"""One training step: forward, backward, unscale, clip, step, and its share of the
epoch's sums (``TrainStep.plain``, first below), then what makes it safe without the
host waiting: a NaN/Inf step is skipped on the device (``step_unless_nonfinite``) and
BatchNorm's running statistics are put back after it (``TrainStep.run``).

The order is nanoGPT's: scale -> backward -> unscale -> clip -> step -> update ->
zero_grad, so clipping sees real gradient units, and one GradScaler lives for the whole
run. The CUDA graph (captured_step.py) wraps ``TrainStep.run``; it repeats none of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from stable_cnn.config import ClippingConfig
from stable_cnn.data.augment import BatchMixing
from stable_cnn.state.progress import EpochProgress, StepOutcome
from stable_cnn.system.hardware import Precision, Runtime
from stable_cnn.training.batchnorm_guard import BatchNormGuard

Batch = tuple[torch.Tensor, torch.Tensor]  # images and labels, on the run's device


class TrainStep:
    """One optimizer step, built once per run: nothing in it reads the device."""

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        clipping: ClippingConfig,
        runtime: Runtime,
        loss_spike_factor: float = 2.0,
        no_sync: Callable[[], AbstractContextManager] | None = None,
        mixing: BatchMixing | None = None,
    ) -> None:
        self.model = model  # compiled or not, wrapped in DDP or not
        self.criterion = criterion
        self.optimizer = optimizer
        self.scaler = scaler
        self.clipping = clipping
        self.runtime = runtime
        self.loss_spike_factor = loss_spike_factor
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.norm_guard = BatchNormGuard.of(model)
        self.sync_free = skips_on_device(optimizer)
        self.no_sync = no_sync or contextlib.nullcontext  # DDP's: keep gradients local
        self.mixing = mixing  # mixup or cutmix, or None
        self.last_loss: torch.Tensor | None = None  # the last step's (the range test reads it)

    def plain(
        self, batches: list[Batch], progress: EpochProgress, veto: bool = False
    ) -> StepOutcome:
        """One optimizer step over a step's batches (one, unless gradients accumulate),
        added to ``progress``. ``veto`` skips the update (a CUDA graph's warm-up)."""
        share, finite, seen = 1.0 / len(batches), None, []
        for index, (images, labels) in enumerate(batches):
            targets = labels
            if self.mixing is not None:  # labels: each image's larger share's, for accuracy
                images, targets, labels = self.mixing(images, labels)
            last = index == len(batches) - 1  # DDP averages gradients only then
            with contextlib.nullcontext() if last else self.no_sync():
                with autocast(self.runtime.device, self.runtime.precision):
                    logits = self.model(images)
                    loss = self.criterion(logits, targets)
                loss_finite = backward(loss, self.scaler, share)
            finite = loss_finite if finite is None else finite & loss_finite
            seen.append((loss.detach(), logits.detach(), labels))
        step = unscale_clip_step(
            self.parameters,
            self.optimizer,
            self.scaler,
            self.clipping,
            finite,
            self.sync_free,
            veto,
        )
        self.last_loss, logits, labels = joined(seen)
        fp16 = self.scaler.is_enabled()
        progress.record(step, self.last_loss, logits, labels, self.loss_spike_factor, fp16)
        return step

    def run(self, batches: list[Batch], progress: EpochProgress, veto: bool = False) -> StepOutcome:
        """The plain step, with BatchNorm's running statistics (updated by the forward
        pass, before the step is judged) put back where the step was skipped."""
        self.norm_guard.snapshot()
        step = self.plain(batches, progress, veto)
        self.norm_guard.keep_if(step.applied & (not veto))
        return step


def joined(seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """A step's loss (the mean of its batches'), logits and labels."""
    if len(seen) == 1:
        return seen[0]
    losses, logits, labels = zip(*seen, strict=True)
    return torch.stack(losses).mean(), torch.cat(logits), torch.cat(labels)


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


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Fused optimizers skip their update when ``found_inf`` is set, inside the kernel;
    so does an optimizer that says it ``skips_on_device`` (optimizer=muon's)."""
    if getattr(optimizer, "skips_on_device", False):
        return True
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def poison_gradients_unless_finite(loss: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``loss`` itself where ``finite`` (times exactly 1), else a loss whose gradients are
    all NaN. A loss can be Inf with finite gradients (an overflowed logit under label
    smoothing); the gradients then carry the verdict, through DDP's average too."""
    return loss * torch.where(finite, 1.0, float("nan"))


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler, share: float = 1.0) -> torch.Tensor:
    """Add ``loss``'s gradients (times ``share``: 1/N for one of N accumulated
    micro-batches) to the parameters'; returns whether the loss was finite (a device
    tensor). A non-finite loss makes every gradient NaN (``poison_gradients_unless_finite``),
    so the gradients alone decide the step. With several processes they are already
    averaged (DDP): one process's NaN or Inf loss reaches every process's gradients, and
    every process skips the same steps without a collective of its own."""
    loss_finite = loss.detach().isfinite()
    scaled = loss * share if share != 1.0 else loss
    scaler.scale(poison_gradients_unless_finite(scaled, loss_finite)).backward()
    return loss_finite


def unscale_clip_step(
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clipping: ClippingConfig,
    loss_finite: torch.Tensor,
    sync_free: bool,
    veto: bool = False,
) -> StepOutcome:
    """Unscale, clip and step on the gradients ``backward`` left, then clear them."""
    scaler.unscale_(optimizer)  # clip in real gradient units (fp16)
    grad_norm, grad_norm_clipped = clip_gradients(parameters, clipping)
    outcome = StepOutcome(grad_norm, grad_norm_clipped, loss_finite, grad_norm.isfinite())
    step_unless_nonfinite(optimizer, scaler, outcome.applied, sync_free, veto)
    optimizer.zero_grad(set_to_none=True)
    return outcome


def step_unless_nonfinite(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    applied: torch.Tensor,
    sync_free: bool,
    veto: bool = False,
) -> None:
    """``optimizer.step()`` where ``applied`` (a device flag: loss and gradients finite),
    else nothing: the weights and the optimizer state stay as they were. ``sync_free``
    (``skips_on_device``): decided on the device; otherwise one host read of the flag.
    ``veto`` skips the update whatever the flag says (a CUDA graph's warm-up steps)."""
    if veto and scaler.is_enabled():
        raise ValueError("veto needs amp without a GradScaler (bf16 or fp32)")
    if scaler.is_enabled():
        scaler.step(optimizer)  # fp16: the scaler found the same NaN/Inf and skips itself
    elif sync_free:  # GradScaler's own contract with fused optimizers: found_inf=1 skips
        skip = torch.ones_like(applied) if veto else ~applied
        optimizer.found_inf = skip.float()  # exactly 0 or 1: the kernels test for 1
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif applied and not veto:  # host read: this optimizer cannot skip on the device
        optimizer.step()
    scaler.update()  # fp16: lowers the scale after a skipped step; else does nothing


def optimizer_step(
    loss: torch.Tensor,
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clipping: ClippingConfig,
) -> StepOutcome:
    """The step for one loss a hand-written loop computed: backward, unscale, clip, step."""
    loss_finite = backward(loss, scaler)
    sync_free = skips_on_device(optimizer)
    return unscale_clip_step(parameters, optimizer, scaler, clipping, loss_finite, sync_free)


def start_momentum_at_zero(optimizer: torch.optim.Optimizer) -> None:
    """Give SGD's momentum buffers their first value (zeros) before the first step.

    A fused SGD allocates them uninitialised on its first step and fills them in the
    kernel; a skipped first step (NaN at step 1, or fp16's first overflow) would leave
    garbage there. Starting from zeros gives the same first update (dampening 0)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param)
