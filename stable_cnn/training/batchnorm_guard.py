"""BatchNorm's running statistics put back after a skipped step, on the device
(training/step.py's TrainStep.run wraps the plain step in it)."""

from __future__ import annotations

import weakref

import torch
from torch import nn


class BatchNormGuard:
    """Puts BatchNorm's running statistics back after a skipped step, on the device.

    BatchNorm updates its statistics in the forward pass, before the step can be judged,
    so one NaN batch would poison them. The guard makes every running mean and variance a
    view of one flat tensor (and every batch counter a view of another), so a snapshot is
    one copy and the restore one select, instead of a clone and a copy per buffer.
    """

    def __init__(self, model: nn.Module) -> None:
        norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        self.statistics = _flatten_buffers(norms, ("running_mean", "running_var"))
        self.counters = _flatten_buffers(norms, ("num_batches_tracked",))
        self.saved = None if self.statistics is None else torch.empty_like(self.statistics)

    @classmethod
    def of(cls, model: nn.Module) -> BatchNormGuard:
        """The model's guard, made once: the same buffers every epoch (a compiled model
        would recompile if they were replaced). Remade if ``model.to()`` replaced them."""
        guard = _GUARDS.get(model)
        if guard is None or not guard.still_backs(model):
            guard = _GUARDS[model] = cls(model)
        return guard

    def still_backs(self, model: nn.Module) -> bool:
        first = next(
            (
                m.running_mean
                for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
            ),
            None,
        )
        if first is None or self.statistics is None:
            return first is None and self.statistics is None
        return first.data_ptr() == self.statistics.data_ptr()

    def snapshot(self) -> None:
        if self.saved is not None:
            self.saved.copy_(self.statistics)

    def keep_if(self, applied: torch.Tensor) -> None:
        """Keep this step's statistics if ``applied``, else restore the snapshot."""
        if self.saved is None:
            return
        self.statistics.copy_(torch.where(applied, self.statistics, self.saved))
        self.counters.sub_((~applied).to(self.counters.dtype))


_GUARDS: weakref.WeakKeyDictionary[nn.Module, BatchNormGuard] = weakref.WeakKeyDictionary()


def _flatten_buffers(modules: list[nn.Module], names: tuple[str, ...]) -> torch.Tensor | None:
    """One flat tensor holding the named buffers of ``modules``, which become views of it."""
    buffers = [(m, name) for m in modules for name in names if getattr(m, name) is not None]
    if not buffers:
        return None
    flat = torch.cat([getattr(m, name).detach().reshape(-1) for m, name in buffers])
    offset = 0
    for module, name in buffers:
        old = getattr(module, name)
        setattr(module, name, flat[offset : offset + old.numel()].view_as(old))
        offset += old.numel()
    return flat
