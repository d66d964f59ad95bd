"""Weight EMA: an exponential moving average of the model's weights and BatchNorm
statistics, updated after every optimizer step (timm's ModelEmaV3, torchvision's
reference scripts). The average is a smoother, usually better model than the last step's
weights; with ``ema=on`` it is the one a run validates, keeps, tests and hands on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """``average = decay * average + (1 - decay) * weights``, for every parameter and
    floating-point buffer (BatchNorm's running mean and variance too); integer buffers
    (BatchNorm's batch counters) are copied. With ``warmup``, the decay starts low and
    rises as ``min(decay, (1 + n) / (10 + n))`` after n earlier steps (TensorFlow's
    num_updates rule), so a short run is not stuck near its initial weights.

    Nothing here reads the device: the decay is a Python number computed from the run's
    step count, and one foreach kernel updates all tensors."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.source = model  # the plain model (not a compiled wrapper): tensors pair in order
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (1, 2, ...)."""
        earlier = step - 1
        return self.decay if not self.warmup else min(self.decay, (1 + earlier) / (10 + earlier))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the source model's weights after optimizer step
        ``step`` of the run."""
        # gathered each time: a BatchNormGuard may have made the buffers views of one tensor
        averaged, current = _tensors(self.model), _tensors(self.source)
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        counters = [
            (a, c) for a, c in zip(averaged, current, strict=True) if not a.is_floating_point()
        ]
        weight = 1.0 - self.decay_at(step)
        torch._foreach_lerp_([a for a, _ in floats], [c.detach() for _, c in floats], weight)
        for average, value in counters:
            average.copy_(value)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The average (an older version's count of updates is the run's step count)."""
        self.model.load_state_dict(state["model"])


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]
