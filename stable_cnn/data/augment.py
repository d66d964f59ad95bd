"""Whole-batch augmentation and normalisation of image tensors, on their device.

These match torchvision's per-image ``RandomCrop(size, padding)`` (zero fill),
``RandomHorizontalFlip()`` and ``RandomErasing()`` (value 0 after normalisation) in
distribution, without a Python loop over images and without reading the device.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

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


def soft_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) class indices -> (N, num_classes) one-hot rows (scatter: F.one_hot reads the
    device to check the labels)."""
    rows = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    return rows.scatter_(1, labels[:, None], 1.0)


@dataclass(frozen=True)
class BatchMixing:
    """Mixup and CutMix (torchvision.transforms.v2's MixUp and CutMix, for a whole batch on
    its device): each image is mixed with the next one in the batch, by a weight
    lambda ~ Beta(alpha, alpha) drawn once per batch; mixup blends the two images, cutmix
    pastes a box of area 1 - lambda from the other. The targets are the labels mixed in
    the same proportion, which the loss's label smoothing then smooths. With both alphas
    set, a batch gets one or the other, half the time each.

    The draws come from Python's generator, seeded with the run and saved in its
    checkpoints (exact resume), so nothing here reads the device."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    probability: float = 1.0  # the fraction of batches mixed

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, targets for the loss, each image's larger share's label for
        accuracy); targets are the labels themselves for a batch left unmixed."""
        if random.random() >= self.probability:
            return images, labels, labels
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or random.random() < 0.5)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        weight = random.betavariate(alpha, alpha)
        partner, partner_labels = images.roll(1, 0), labels.roll(1, 0)
        if cutmix:
            images, weight = paste_box(images, partner, weight)
        else:
            images = images * weight + partner * (1 - weight)
        targets = soft_targets(labels, self.num_classes).mul_(weight)
        targets.add_(soft_targets(partner_labels, self.num_classes), alpha=1 - weight)
        return images, targets, labels if weight >= 0.5 else partner_labels


def paste_box(
    images: torch.Tensor, partner: torch.Tensor, weight: float
) -> tuple[torch.Tensor, float]:
    """CutMix's box: area (1 - weight) of the image, centred at a uniform pixel and cut
    at the borders; returns the images with ``partner``'s box pasted in and the share
    of each image that is still its own."""
    height, width = images.shape[-2:]
    half_h = height * math.sqrt(1 - weight) / 2
    half_w = width * math.sqrt(1 - weight) / 2
    centre_y, centre_x = random.randrange(height), random.randrange(width)
    top, bottom = max(round(centre_y - half_h), 0), min(round(centre_y + half_h), height)
    left, right = max(round(centre_x - half_w), 0), min(round(centre_x + half_w), width)
    images = images.clone()
    images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return images, 1 - (bottom - top) * (right - left) / (height * width)


def shifted(images: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """The images moved by (down, right) pixels, the uncovered edge repeated."""
    pad = max(abs(down), abs(right))
    height, width = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    return padded[..., pad - down : pad - down + height, pad - right : pad - right + width]


@dataclass(frozen=True)
class TestTimeAugmentation:
    """The logits a test sees: the model's on the images, or with ``flip`` the mean of
    the images' and their mirror images', and with ``translate`` pixels, half of that
    and half the mean over copies shifted diagonally by +-translate pixels (flipped
    too where ``flip``): airbench's test-time augmentation."""

    flip: bool = False
    translate: int = 0

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images, images.flip(3)] if self.flip else [images]

    def __call__(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        if not self.flip and self.translate == 0:
            return model(images)  # no augmentation: no copy of the logits either
        centred = torch.stack([model(view) for view in self.views(images)]).mean(0)
        if self.translate == 0:
            return centred
        step = self.translate
        moved = [shifted(images, step, step), shifted(images, -step, -step)]
        others = torch.stack([model(view) for image in moved for view in self.views(image)])
        return (centred + others.mean(0)) / 2
