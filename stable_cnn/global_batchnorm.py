"""BatchNorm over the batches of all processes on CPUs, where torch's SyncBatchNorm
refuses to run (DDP rejects it on CPU modules): ``model.sync_batchnorm=true`` under
gloo. On GPUs, distributed.to_sync_batchnorm uses torch's own."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the batches of all processes, for CPUs (gloo). The per-channel
    sums go through an all-reduce that autograd differentiates (its backward sums the
    gradients over the processes), so forward and backward both see the global batch;
    in eval mode it is plain BatchNorm on the running statistics."""

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every BatchNorm2d replaced by one of these, sharing its
        parameters and buffers (as torch's SyncBatchNorm.convert_sync_batchnorm does)."""
        if type(module) is nn.BatchNorm2d:
            synced = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats)  # fmt: skip
            synced.weight, synced.bias = module.weight, module.bias
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
            return synced
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(images)
        from torch.distributed.nn.functional import all_reduce

        x = images.float()  # (N, C, H, W); statistics in fp32 under autocast too
        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        # Two passes (the mean, then the squared deviations from it), as exact as
        # BatchNorm's own; the all-reduces are the global batch's, with a gradient.
        sums = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        total = sums[-1]
        mean = sums[:channels] / total
        centred = x - mean.view(1, channels, 1, 1)
        variance = all_reduce((centred * centred).sum((0, 2, 3))) / total
        if self.track_running_stats:
            with torch.no_grad():  # in place: BatchNormGuard's flat views must stay valid
                unbiased = variance * (total / (total - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
                self.num_batches_tracked.add_(1)
        shape = (1, channels, 1, 1)
        out = centred * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(images.dtype)
