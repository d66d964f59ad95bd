"""Images of any kind a dataset returns (PIL images, tensors, NumPy arrays) as uint8 at
the run's channels and size: one at a time, many in parallel, and their per-channel
statistics in bounded memory."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from stable_cnn.config import DataConfig
from stable_cnn.errors import DataError

CHUNK_BYTES = 2 * 2**20  # uint8 images turned into floats at once for the statistics (~17x)
STREAM_BYTES = 4 * 2**20  # images read at once from a file for the statistics


def image_tensor(image: Any, channels: int | None, size: int | None, where: str) -> torch.Tensor:
    """One image as a uint8 tensor (C, H, W), with ``channels`` and ``size`` where given
    (grey becomes RGB and back; other sizes are resized); one line when it is not an image."""
    from PIL import Image
    from torchvision.transforms import functional

    if isinstance(image, Image.Image):
        if channels is None:  # as it is: grey stays grey, the rest (RGBA, palette) is RGB
            channels = 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
        image = image.convert("L" if channels == 1 else "RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        tensor = functional.pil_to_tensor(image)
    else:
        tensor = as_uint8(image, where)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise DataError(
            f"data=custom: {where} has shape {tuple(tensor.shape)}: images must be "
            f"(C, H, W) with 1 or 3 channels (or PIL images)"
        )
    if channels is not None and tensor.shape[0] != channels:
        tensor = tensor.expand(3, -1, -1) if channels == 3 else functional.rgb_to_grayscale(tensor)
    if size is not None and tuple(tensor.shape[1:]) != (size, size):
        tensor = functional.resize(tensor, [size, size], antialias=True)
    return tensor.contiguous()


def as_uint8(image: Any, where: str) -> torch.Tensor:
    """A tensor or array image as uint8 (C, H, W): floats are read as [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] in (1, 3) and image.shape[0] not in (1, 3):
            image = image.transpose(2, 0, 1)  # (H, W, C), as image libraries give them
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise DataError(
            f"data=custom: {where} is a {type(image).__name__}: images must be "
            f"tensors (C, H, W), NumPy arrays or PIL images"
        )
    tensor = image.unsqueeze(0) if image.ndim == 2 else image
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise DataError(
            f"data=custom: {where} is a {tensor.dtype} tensor: images must be "
            f"floats in [0, 1] or uint8"
        )
    low, high = tensor.aminmax()
    if low < -0.01 or high > 1.01:  # a host read per image: decoding is on the CPU anyway
        raise DataError(
            f"data=custom: {where} has values from {low:.2f} to {high:.2f}: images must be in "
            f"[0, 1] (leave normalising to stable-cnn: drop transforms.Normalize)"
        )
    return (tensor.float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def as_label(label: Any, where: str) -> int:
    """An integer label from an int, a NumPy integer or a one-element tensor or array."""
    if (
        isinstance(label, torch.Tensor | np.ndarray)
        and label.ndim <= 1
        and len(label.reshape(-1)) == 1
    ):
        label = label.reshape(-1)[0].item()
    if isinstance(label, bool) or not isinstance(label, int | np.integer):
        raise DataError(
            f"data=custom: {where} has label {label!r}: labels must be integers 0..num_classes-1"
        )
    return int(label)


def decode(
    dataset: Any, index: torch.Tensor, config: DataConfig, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``index`` of ``dataset`` as one uint8 tensor (N, C, H, W), and their
    labels; decoded by as many threads as torch computes with in this process, its share
    of the cores (PIL and torch release the GIL while they decode and resize), so
    ``dataset[i]`` must be safe to call from several threads at once."""
    channels, size = config.in_channels, config.image_size
    images = torch.empty((len(index), channels, size, size), dtype=torch.uint8)
    labels = torch.empty(len(index), dtype=torch.int64)
    positions = index.tolist()

    def decode_one(position: int) -> None:
        image, label = dataset[positions[position]]
        where = f"{split} image {positions[position]}"
        images[position] = image_tensor(image, channels, size, where)
        labels[position] = as_label(label, where)

    threads = torch.get_num_threads()  # trainer.num_threads, or this process's share
    with ThreadPoolExecutor(max(1, min(threads, len(positions)))) as pool:
        for _ in pool.map(decode_one, range(len(positions))):  # the first error, in order
            pass
    return images, labels


class ChannelStats:
    """Per-channel mean and std of uint8 images, in [0, 1] units, added a batch at a time
    and each batch a few megabytes at a time: no float copy of many images is made."""

    def __init__(self, channels: int) -> None:
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.squares = torch.zeros(channels, dtype=torch.float64)
        self.count = 0  # pixels per channel

    def add(self, images: torch.Tensor) -> None:
        per_image = max(1, images[0].numel())
        for chunk in images.split(max(1, CHUNK_BYTES // per_image)):
            values = chunk.transpose(0, 1).reshape(chunk.shape[1], -1).double()
            self.total += values.sum(1)
            self.squares += values.square_().sum(1)
            self.count += values.shape[1]

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.total / self.count / 255
        std = (self.squares / self.count / 255**2 - mean.square()).clamp_min(1e-12).sqrt()
        return [round(m, 4) for m in mean.tolist()], [round(max(s, 1e-3), 4) for s in std.tolist()]


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    stats = ChannelStats(images.shape[1])
    stats.add(images)
    return stats.result()


def streamed_stats(images: Any) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) held in memory or read from
    a file (FileRows), a few megabytes at a time."""
    stats = ChannelStats(images.shape[1])
    chunk = max(1, STREAM_BYTES // int(np.prod(images.shape[1:])))
    for start in range(0, len(images), chunk):
        stats.add(images[start : start + chunk])
    return stats.result()
