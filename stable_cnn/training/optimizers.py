"""Optimizers (conf/optimizer/), fused, with BatchNorm and bias parameters kept out of
weight decay."""

from __future__ import annotations

import torch
from torch import nn

from stable_cnn.config import AdamWConfig, OptimizerConfig, SGDConfig
from stable_cnn.errors import ConfigError
from stable_cnn.training.step import start_momentum_at_zero


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool
) -> list[dict]:
    """Split parameters so that BatchNorm weights and biases (1-D tensors) get no decay:
    decaying them only fights the normalisation and rarely helps."""
    if decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# Devices with fused SGD and AdamW kernels: one kernel for the whole update, and the
# update can be skipped on the device (found_inf), so a NaN guard costs no host sync.
FUSED_DEVICES = ("cuda", "cpu")


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The configured optimizer, fused where the parameters' device has fused kernels."""
    groups = parameter_groups(model, config.weight_decay, config.decay_norm_and_bias)
    device = next(model.parameters()).device
    fused = True if device.type in FUSED_DEVICES else None  # None: torch's default
    if isinstance(config, SGDConfig):
        optimizer = torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, fused=fused
        )
        start_momentum_at_zero(optimizer)
        return optimizer
    if isinstance(config, AdamWConfig):
        return torch.optim.AdamW(
            groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused
        )
    raise ConfigError(f"optimizer={config.name!r} is not known: use sgd or adamw")
