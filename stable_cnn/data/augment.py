"""Whole-batch augmentation and normalisation of image tensors, on their device.

These match torchvision's per-image ``RandomCrop(size, padding)`` (zero fill),
``RandomHorizontalFlip()`` and ``RandomErasing()`` (value 0 after normalisation) in
distribution, without a Python loop over images and without reading the device.
"""

from __future__ import annotations

import math

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


ERASE_ATTEMPTS = 10  # torchvision's RandomErasing tries this many boxes before giving up


def random_erase(
    images: torch.Tensor,
    probability: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Random erasing (cutout), torchvision's way, for a whole normalised batch: with
    ``probability``, each image gets one rectangle set to 0 (the mean), whose area is a
    uniform fraction ``scale`` of the image and whose aspect ratio is log-uniform in
    ``ratio``; of ERASE_ATTEMPTS candidate boxes the first that fits is used, none if
    none fits. Every image draws all its candidates at once, so nothing syncs."""
    if probability <= 0:
        return images
    n, _, height, width = images.shape
    device = images.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device)

    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniform(n, ERASE_ATTEMPTS))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * uniform(n, ERASE_ATTEMPTS))
    box_h = torch.sqrt(area * aspect).round().long()  # (N, attempts)
    box_w = torch.sqrt(area / aspect).round().long()
    fits = (box_h < height) & (box_w < width)
    first = fits.long().argmax(1, keepdim=True)  # first fitting attempt (0 if none fits)
    box_h, box_w = box_h.gather(1, first), box_w.gather(1, first)  # (N, 1)
    erase = fits.any(1, keepdim=True) & (uniform(n, 1) < probability)
    top = (uniform(n, 1) * (height - box_h + 1)).floor().long()
    left = (uniform(n, 1) * (width - box_w + 1)).floor().long()
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    inside_rows = (rows >= top) & (rows < top + box_h) & erase  # (N, H)
    inside_cols = (cols >= left) & (cols < left + box_w)  # (N, W)
    mask = inside_rows[:, None, :, None] & inside_cols[:, None, None, :]  # (N, 1, H, W)
    return images.masked_fill(mask, 0.0)


def flip_averaged_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: the mean of the logits for the images and their
    mirror images (for data whose classes do not change when mirrored)."""
    return (model(images) + model(images.flip(3))) / 2
