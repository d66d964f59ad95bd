"""Optimizers (conf/optimizer/), fused, with BatchNorm and bias parameters kept out of
weight decay; Muon's pairing with an auxiliary optimizer is in muon.py."""

from __future__ import annotations

import torch
from torch import nn

from stable_cnn.config import AdamWConfig, MuonConfig, OptimizerConfig, SGDConfig
from stable_cnn.errors import ConfigError
from stable_cnn.training.muon import MatrixMuon, MuonWithAuxiliary
from stable_cnn.training.step import start_momentum_at_zero


def parameter_groups(
    parameters: list[nn.Parameter], weight_decay: float, decay_norm_and_bias: bool
) -> list[dict]:
    """Split parameters so that BatchNorm weights and biases (1-D tensors) get no decay:
    decaying them only fights the normalisation and rarely helps."""
    if decay_norm_and_bias:
        return [{"params": parameters, "weight_decay": weight_decay}]
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# Devices with fused SGD and AdamW kernels: one kernel for the whole update, and the
# update can be skipped on the device (found_inf), so a NaN guard costs no host sync.
FUSED_DEVICES = ("cuda", "cpu")


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The configured optimizer, fused where the parameters' device has fused kernels."""
    if isinstance(config, MuonConfig):
        return build_muon(model, config)
    groups = parameter_groups(
        list(model.parameters()), config.weight_decay, config.decay_norm_and_bias
    )
    fused = fused_where_possible(model)
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
    raise ConfigError(f"optimizer={config.name!r} is not known: use sgd, adamw or muon")


def fused_where_possible(model: nn.Module) -> bool | None:
    device = next(model.parameters()).device
    return True if device.type in FUSED_DEVICES else None  # None: torch's default


def muon_weights(model: nn.Module, include_head: bool) -> list[nn.Parameter]:
    """The weights Muon trains: every trainable weight of rank 2 or more (convolution
    filters, linear layers), but the classifier's (the model's last linear layer) unless
    ``include_head``: Muon is for hidden layers."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = None if include_head or not linears else linears[-1].weight
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and p is not head]


def build_muon(model: nn.Module, config: MuonConfig) -> MuonWithAuxiliary:
    """Muon for the hidden layers' weights, a fused SGD or AdamW for everything else."""
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(
            f"optimizer=muon needs torch.optim.Muon (torch 2.9 on; this is "
            f"{torch.__version__}): upgrade torch, or use optimizer=sgd"
        )
    weights = muon_weights(model, config.muon_head)
    if not weights:
        raise ConfigError(
            "optimizer=muon found no convolution or hidden linear weights in "
            "this model: use optimizer=sgd or adamw"
        )
    chosen = set(weights)
    rest = [p for p in model.parameters() if p.requires_grad and p not in chosen]
    muon = MatrixMuon(
        weights,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        ns_steps=config.ns_steps,
        adjust_lr_fn=config.adjust_lr,
    )
    groups = parameter_groups(rest, config.auxiliary_weight_decay, config.decay_norm_and_bias)
    groups = [g for g in groups if g["params"]]
    fused = fused_where_possible(model)
    if not groups:  # Muon trains every parameter
        auxiliary = None
    elif config.auxiliary == "adamw":
        betas = (config.auxiliary_momentum, 0.999)
        auxiliary = torch.optim.AdamW(groups, lr=config.auxiliary_lr, betas=betas, fused=fused)
    else:
        momentum = config.auxiliary_momentum
        auxiliary = torch.optim.SGD(
            groups, lr=config.auxiliary_lr, momentum=momentum, nesterov=momentum > 0, fused=fused
        )
        start_momentum_at_zero(auxiliary)
    return MuonWithAuxiliary(muon, auxiliary)
