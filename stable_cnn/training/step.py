"""One training step, decided on the device: forward, backward, unscale, clip, step, and
its share of the epoch's sums, with NaN/Inf steps skipped without the host reading a flag.

The order is nanoGPT's: scale -> backward -> unscale -> clip -> step -> update ->
zero_grad, so clipping sees real gradient units, and one GradScaler lives for the whole
run. Whether a step is applied is a boolean tensor: a fused optimizer (SGD, AdamW on CUDA
and CPU) takes it as ``found_inf`` and skips its own update, and BatchNorm's running
statistics are put back by a device-side select. On a GPU nothing here waits for it.
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


def update(
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clipping: ClippingConfig,
    loss_finite: torch.Tensor,
    sync_free: bool | None = None,
    veto: bool = False,
) -> StepOutcome:
    """Clip the unscaled gradients and step; a step whose loss or gradients are NaN/Inf is
    skipped (the weights and the optimizer state stay as they were).

    ``sync_free`` (default: whether the optimizer is fused) decides on the device; an
    optimizer that cannot skip by itself costs one host read of the flag per step.
    ``veto`` skips the update whatever the flags say (a CUDA graph's warm-up steps)."""
    scaler.unscale_(optimizer)
    grad_norm, grad_norm_clipped = clip_gradients(parameters, clipping)
    outcome = StepOutcome(grad_norm, grad_norm_clipped, loss_finite, grad_norm.isfinite())
    if sync_free is None:
        sync_free = skips_on_device(optimizer)
    if veto and scaler.is_enabled():
        raise ValueError("veto needs amp without a GradScaler (bf16 or fp32)")
    if scaler.is_enabled():
        # fp16: the GradScaler found the same NaN/Inf while unscaling and skips the step
        # itself (through found_inf into a fused optimizer: no sync), lowering its scale.
        scaler.step(optimizer)
    elif sync_free:
        # The contract GradScaler itself uses with fused optimizers (torch.amp.GradScaler.
        # step): a float tensor attribute `found_inf`, non-zero = skip this update.
        skip = torch.ones_like(outcome.applied) if veto else ~outcome.applied
        optimizer.found_inf = skip.float()  # exactly 0 or 1: the kernels test for 1
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif outcome.applied and not veto:  # host read: this optimizer cannot skip on the device
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return outcome


def optimizer_step(
    loss: torch.Tensor,
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clipping: ClippingConfig,
    sync_free: bool | None = None,
    veto: bool = False,
) -> StepOutcome:
    """Backward, clip the unscaled gradients, step (nanoGPT's order: scale -> backward ->
    unscale -> clip -> step -> update -> zero_grad): ``backward`` then ``update``."""
    loss_finite = backward(loss, scaler)
    return update(parameters, optimizer, scaler, clipping, loss_finite, sync_free, veto)


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


class TrainStep:
    """Everything one optimizer step does, built once per run: forward and loss under
    autocast for each of its micro-batches (one, unless gradients are accumulated, each
    mixed first by ``mixing``: mixup or cutmix), the optimizer step, the BatchNorm
    guard, and the step's share of the epoch's sums. Nothing in it reads the device
    (see ``update``)."""

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
        # DDP's no_sync: the micro-batches before the last keep their gradients local
        self.no_sync = no_sync or contextlib.nullcontext
        self.last_loss: torch.Tensor | None = None  # the last step's (the range test reads it)
        self.mixing = mixing

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        progress: EpochProgress,
        veto: bool = False,
    ) -> StepOutcome:
        """Train on one batch (already on the device) and add it to ``progress``."""
        return self.accumulated([(images, labels)], progress, veto)

    def run(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], progress: EpochProgress
    ) -> StepOutcome:
        """One optimizer step over a step's batches (one, unless gradients accumulate)."""
        if len(micro_batches) == 1:
            return self(*micro_batches[0], progress)  # a captured step replays here
        return self.accumulated(micro_batches, progress)

    def accumulated(
        self,
        micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
        progress: EpochProgress,
        veto: bool = False,
    ) -> StepOutcome:
        """One optimizer step over the gradients of several micro-batches (on the device),
        each weighing as much as its share of the images; the step is judged, clipped and
        counted once, on the accumulated gradient."""
        self.norm_guard.snapshot()
        share = 1.0 / len(micro_batches)
        losses, all_logits, all_labels, finite = [], [], [], None
        for index, (images, labels) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            targets = labels
            if self.mixing is not None:  # labels: each image's larger share's, for accuracy
                images, targets, labels = self.mixing(images, labels)
            with contextlib.nullcontext() if last else self.no_sync():
                with autocast(self.runtime.device, self.runtime.precision):
                    logits = self.model(images)
                    loss = self.criterion(logits, targets)
                loss_finite = backward(loss, self.scaler, share)
            finite = loss_finite if finite is None else finite & loss_finite
            losses.append(loss.detach())
            all_logits.append(logits.detach())
            all_labels.append(labels)
        step = update(
            self.parameters,
            self.optimizer,
            self.scaler,
            self.clipping,
            finite,
            self.sync_free,
            veto,
        )
        self.norm_guard.keep_if(step.applied & (not veto))
        if len(micro_batches) == 1:
            loss, logits, labels = losses[0], all_logits[0], all_labels[0]
        else:
            loss = torch.stack(losses).mean()
            logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        self.last_loss = loss
        progress.record(
            step, loss, logits, labels, self.loss_spike_factor, self.scaler.is_enabled()
        )
        return step
