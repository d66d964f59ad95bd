"""Whole-batch augmentation and normalisation of uint8 image tensors, on their device.

These match torchvision's per-image ``RandomCrop(size, padding)`` (zero fill) and
``RandomHorizontalFlip()`` in distribution, without a Python loop over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` on each side, then cut a random HxW window per image."""
    if padding == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    shifts = 2 * padding + 1
    top = torch.randint(shifts, (n, 1), generator=generator, device=images.device)
    left = torch.randint(shifts, (n, 1), generator=generator, device=images.device)
    rows = top + torch.arange(height, device=images.device)  # (N, H)
    cols = left + torch.arange(width, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Gather on an NHWC view so the three index tensors broadcast to (N, H, W).
    cropped = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2)  # (N, C, H, W), channels_last in memory


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 (x / 255 - mean) / std; mean and std shaped (1, C, 1, 1)."""
    return images.float().sub_(mean * 255.0).div_(std * 255.0)
