"""BatchNorm over the batches of all processes (``model.sync_batchnorm=true``), on CPUs
and GPUs alike, without the host waiting for the device.

torch's own SyncBatchNorm refuses CPU modules, and on a GPU its forward pass indexes
the gathered counts, means and variances with a boolean mask (to drop empty shards):
three host syncs per BatchNorm layer per step, 18 a step for the default SmallCNN.
This one sums per-channel statistics with one all-reduce per pass and decides
everything else on the device.

A BatchNorm subclass whose forward does more than normalise (timm's BatchNormAct2d
applies its drop-out and activation there) keeps doing it, or is refused: converting
it to plain BatchNorm would silently drop what it adds.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stable_cnn.errors import ConfigError


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the batches of all processes, for inputs of any rank >= 2 (N, C, ...).

    The per-channel sums go through an all-reduce that autograd differentiates (its
    backward sums the gradients over the processes), so forward and backward both see
    the global batch. Two passes (the mean, then the squared deviations from it) make
    it as exact as BatchNorm's own. In eval mode, or alone, it is plain BatchNorm (with
    no running statistics, each process normalises with its own batch's)."""

    def _check_input_dim(self, images: torch.Tensor) -> None:
        if images.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {images.dim()}D input)")

    @classmethod
    def convert(cls, module: nn.Module, name: str = "") -> nn.Module:
        """``module`` with every BatchNorm layer (of any dimension, subclasses included)
        replaced by one of these that shares its parameters and buffers, as torch's
        ``SyncBatchNorm.convert_sync_batchnorm`` does. timm's BatchNormAct2d keeps its
        drop-out and activation, as timm's ``convert_sync_batchnorm`` does; a subclass
        with another forward of its own raises ConfigError. ``name``: the module's own,
        for that message."""
        converted = module
        if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
            kind = global_counterpart(module, name)
            converted = kind(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
            )
            if module.affine:
                with torch.no_grad():
                    converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for child_name, child in module.named_children():  # BatchNormAct2d's drop and act too
            path = f"{name}.{child_name}" if name else child_name
            converted.add_module(child_name, cls.convert(child, path))
        return converted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(images)
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # In eval mode, even with no running statistics, each process normalises on its own
        # (as torch's SyncBatchNorm does): processes evaluate unequal numbers of batches,
        # and a collective there would wait for ever.
        if not (self.training and several):
            return super().forward(images)
        x = images.float()  # (N, C, ...); statistics in fp32 under autocast too
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        # A fill on the device, not torch.tensor([...]): that would copy from the host
        # and make the host wait for the GPU.
        count = x.new_full((1,), x.numel() // channels)
        sums = SumOverProcesses.apply(torch.cat([x.sum(dims), count]))
        total = sums[-1]
        mean = sums[:channels] / total
        centred = x - mean.view(shape)
        variance = SumOverProcesses.apply((centred * centred).sum(dims)) / total
        if self.track_running_stats:
            self.update_running_statistics(mean, variance, total)
        out = centred * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(images.dtype)

    @torch.no_grad()
    def update_running_statistics(
        self, mean: torch.Tensor, variance: torch.Tensor, total: torch.Tensor
    ) -> None:
        """As BatchNorm does (unbiased variance; ``momentum=None`` is the cumulative
        average, weight 1/batches), in place: BatchNormGuard's flat views must stay
        valid, and on the device: the batch counter is never read."""
        self.num_batches_tracked.add_(1)
        weight = self.momentum
        if weight is None:
            weight = 1.0 / self.num_batches_tracked
        unbiased = variance * (total / (total - 1).clamp(min=1))
        self.running_mean.lerp_(mean.detach(), weight)
        self.running_var.lerp_(unbiased.detach(), weight)


class GlobalBatchNormAct(GlobalBatchNorm):
    """GlobalBatchNorm for timm's BatchNormAct2d: then its drop-out and activation, its
    ``drop`` and ``act`` children (which convert re-attaches, so the state_dict keys stay
    timm's), as timm's own SyncBatchNormAct does."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(images)))


def global_counterpart(layer: _BatchNorm, name: str) -> type[GlobalBatchNorm]:
    """The global BatchNorm that computes what ``layer`` does; ConfigError if none does
    (a subclass with a forward of its own that this module does not know)."""
    forward = type(layer).forward
    if forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return GlobalBatchNorm
    # Already imported if the model holds timm's layers; importing it here would make
    # timm, an optional extra, a dependency.
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is not None and forward is norm_act.BatchNormAct2d.forward:
        return GlobalBatchNormAct
    kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
    where = f"layer {name!r}" if name else "the model"
    raise ConfigError(
        f"model.sync_batchnorm=true cannot convert {where} ({kind}): its forward does more "
        "than BatchNorm's, which the global BatchNorm would drop; set model.sync_batchnorm=false"
    )


class SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over all processes, differentiable: every process's loss
    depends on every process's input, so the gradient is the sum of the processes'
    gradients. (torch.distributed.nn.functional.all_reduce does the same; torch 2.14
    deprecates it.)"""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gradient: torch.Tensor) -> torch.Tensor:
        summed = gradient.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed)
        return summed
