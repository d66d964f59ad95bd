"""``data=custom``: datasets of your own, from the callable ``data._target_`` names.

It is called with the ``+data.KEY=VALUE`` keys and returns ``(train, test)``: two
map-style datasets (``len`` and ``[i]``) of ``(image, label)`` pairs. An image is a
tensor ``(C, H, W)`` with values in [0, 1] (or uint8), a NumPy array, or a PIL image; a
label is an integer; a dataset's ``classes``, where it has one, names the classes.

What the config leaves null is settled from the data: channels and size from the first
training image, the classes from ``classes`` (else the labels), mean and std from the
training images. The datasets go the in-memory way of the built-in ones (decoded once
into uint8 tensors, augmented a batch at a time: tensors.py) when they fit, else image
by image through DataLoader workers (loaders.py), as ``data=image_folder`` does.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from stable_cnn.config import CustomDataConfig
from stable_cnn.data.loaders import augmentations, loader_splits
from stable_cnn.data.splits import (
    ONE_PROCESS,
    DatasetInfo,
    DataSplits,
    Shard,
    limited,
    split_indices,
)
from stable_cnn.data.tensors import tensor_splits_of
from stable_cnn.errors import ConfigError, DataError
from stable_cnn.system.hardware import available_memory
from stable_cnn.system.imports import find_callable
from stable_cnn.system.seeding import stream_seed

log = logging.getLogger("stable_cnn")

MEMORY_SHARE = 4  # in memory when the uint8 images take at most 1/4 of the memory available
STATS_SAMPLE = 10_000  # the DataLoader way: mean and std from this many training images at most


def custom_splits(
    config: CustomDataConfig,
    seed: int,
    device: torch.device,
    shard: Shard = ONE_PROCESS,
    train_device: torch.device | None = None,
) -> DataSplits:
    """The user's datasets cut into train, val and test, in memory where they fit.
    ``seed`` is the run's; ``train_device`` as for the built-in datasets."""
    train_set, test_set = open_datasets(config)
    config = settle_shape(config, train_set)
    in_memory = config.in_memory
    if in_memory is None:
        in_memory = fits_in_memory(config, len(train_set) + len(test_set))
    if in_memory:
        return in_memory_splits(config, train_set, test_set, seed, device, shard, train_device)
    return worker_splits(config, train_set, test_set, seed, device, shard)


def open_datasets(config: CustomDataConfig) -> tuple[Any, Any]:
    """The callable's (train, test), checked to be two datasets with images in them."""
    where = f"data._target_={config._target_}"
    load = find_callable(config._target_, "data._target_")
    try:
        returned = load(**config.kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}: it is called with the +data.KEY values as "
                          f"keyword arguments") from None  # fmt: skip
    if not (isinstance(returned, (tuple, list)) and len(returned) == 2):
        raise DataError(f"{where} returned a {type(returned).__name__}: it must return "
                        f"(train, test), two datasets of (image, label) pairs")  # fmt: skip
    for split, dataset in zip(("train", "test"), returned, strict=True):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise DataError(f"{where}: its {split} dataset ({type(dataset).__name__}) has no "
                            f"len() and [i]: return map-style datasets")  # fmt: skip
        if len(dataset) == 0:
            raise DataError(f"{where}: its {split} dataset is empty")
    return returned[0], returned[1]


def settle_shape(config: CustomDataConfig, train_set: Any) -> CustomDataConfig:
    """The config with channels and size taken from the first training image where null."""
    if config.in_channels is not None and config.image_size is not None:
        return config
    image, _ = train_set[0]
    channels, height, width = image_tensor(image, None, None, "the first training image").shape
    if config.image_size is None and height != width:
        raise DataError(f"data=custom: the first training image is {height}x{width}, not square: "
                        f"set data.image_size=N to resize every image to NxN")  # fmt: skip
    settled = replace(config, in_channels=config.in_channels or channels,
                      image_size=config.image_size or height)  # fmt: skip
    settled.check_shape()
    return settled


def fits_in_memory(config: CustomDataConfig, images: int) -> bool:
    needed = images * config.in_channels * config.image_size**2
    available = available_memory()
    if available is None:
        return needed <= 2**31
    return needed * MEMORY_SHARE <= available


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
        raise DataError(f"data=custom: {where} has shape {tuple(tensor.shape)}: images must be "
                        f"(C, H, W) with 1 or 3 channels (or PIL images)")  # fmt: skip
    if channels is not None and tensor.shape[0] != channels:
        tensor = (tensor.expand(3, -1, -1) if channels == 3
                  else functional.rgb_to_grayscale(tensor))  # fmt: skip
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
        raise DataError(f"data=custom: {where} is a {type(image).__name__}: images must be "
                        f"tensors (C, H, W), NumPy arrays or PIL images")  # fmt: skip
    tensor = image.unsqueeze(0) if image.ndim == 2 else image
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise DataError(f"data=custom: {where} is a {tensor.dtype} tensor: images must be "
                        f"floats in [0, 1] or uint8")  # fmt: skip
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
        raise DataError(f"data=custom: {where} has label {label!r}: labels must be integers "
                        f"0..num_classes-1")  # fmt: skip
    return int(label)


def decode(dataset: Any, config: CustomDataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``dataset`` as one uint8 tensor (N, C, H, W), and the labels."""
    channels, size = config.in_channels, config.image_size
    images = torch.empty((len(dataset), channels, size, size), dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.int64)
    for i in range(len(dataset)):
        image, label = dataset[i]
        where = f"{split} image {i}"
        images[i] = image_tensor(image, channels, size, where)
        labels[i] = as_label(label, where)
    return images, labels


def class_names(config: CustomDataConfig, datasets: tuple[Any, Any], labels: torch.Tensor | None
                ) -> tuple[str, ...]:  # fmt: skip
    """The classes: the train dataset's ``classes``, else numbered up to data.num_classes,
    else up to the largest of ``labels`` (those of both splits)."""
    named = getattr(datasets[0], "classes", None)
    if named is not None:
        names = tuple(str(name) for name in named)
        if config.num_classes is not None and config.num_classes != len(names):
            raise DataError(f"data.num_classes={config.num_classes} but the train dataset has "
                            f"{len(names)} classes: set data.num_classes=null")  # fmt: skip
        return names
    count = config.num_classes
    if count is None:
        targets = labels if labels is not None else dataset_targets(datasets)
        count = int(targets.max()) + 1
    return tuple(f"class_{k}" for k in range(count))


def dataset_targets(datasets: tuple[Any, Any]) -> torch.Tensor:
    """The labels of the DataLoader way, where the datasets list them (``targets``)."""
    targets = [getattr(dataset, "targets", None) for dataset in datasets]
    if any(t is None for t in targets):
        raise DataError(
            "data=custom: the datasets have neither `classes` nor `targets`: set "
            "data.num_classes=N (or data.in_memory=true, which reads every label)"
        )
    return torch.cat([torch.as_tensor(t).flatten() for t in targets])


def known_targets(dataset: Any) -> torch.Tensor | None:
    """A dataset's labels where it lists them (``targets``, as torchvision's do), so that
    limits and the hold-out keep every class in proportion without reading an image."""
    targets = getattr(dataset, "targets", None)
    if targets is None or len(targets) != len(dataset):
        return None
    return torch.as_tensor(targets).flatten()


def check_labels(labels: torch.Tensor, classes: int, split: str) -> None:
    low, high = (int(v) for v in labels.aminmax())
    if low < 0 or high >= classes:
        raise DataError(f"data=custom: {split} labels run from {low} to {high}, outside "
                        f"0..{classes - 1} for {classes} classes: fix the labels or "
                        f"data.num_classes")  # fmt: skip


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (a few images at a time,
    so that no float copy of the whole set is made)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        values = chunk.transpose(0, 1).reshape(chunk.shape[1], -1).double() / 255
        total += values.sum(1)
        squares += values.square().sum(1)
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return [round(m, 4) for m in mean.tolist()], [round(max(s, 1e-3), 4) for s in std.tolist()]


def settled(config: CustomDataConfig, classes: tuple[str, ...], train_count: int,
            stats: tuple[list[float], list[float]] | None) -> CustomDataConfig:  # fmt: skip
    """The config with every null settled: classes, validation size, mean and std."""
    val_size = config.val_size if config.val_size is not None else max(1, train_count // 10)
    mean, std = (config.mean, config.std) if stats is None else stats
    done = replace(config, num_classes=len(classes), val_size=val_size, mean=mean, std=std)
    done.check_shape()
    return done


def resolved_values(config: CustomDataConfig) -> dict[str, Any]:
    """What the run settled, for its log and its checkpoint's record."""
    keys = ("in_channels", "image_size", "num_classes", "val_size", "mean", "std")
    return {key: getattr(config, key) for key in keys}


def in_memory_splits(config: CustomDataConfig, train_set: Any, test_set: Any, seed: int,
                     device: torch.device, shard: Shard, train_device: torch.device | None,
                     ) -> DataSplits:  # fmt: skip
    log.info("data custom: decoding %d + %d images into memory", len(train_set), len(test_set))
    train_images, train_labels = decode(train_set, config, "train")
    test_images, test_labels = decode(test_set, config, "test")
    classes = class_names(config, (train_set, test_set), torch.cat([train_labels, test_labels]))
    check_labels(train_labels, len(classes), "train")
    check_labels(test_labels, len(classes), "test")
    stats = (
        None if config.mean is not None and config.std is not None else channel_stats(train_images)
    )
    config = settled(config, classes, len(train_labels), stats)
    splits = tensor_splits_of(config, (train_images, train_labels), (test_images, test_labels),
                              classes, device, seed, shard, train_device)  # fmt: skip
    splits.resolved = resolved_values(config)
    return splits


class ImagesOf(Dataset):
    """A user's dataset image by image as the DataLoader way wants it: uint8 (C, H, W) at
    the run's channels and size, then ``transform`` (augmentation and normalisation)."""

    def __init__(self, dataset: Any, config: CustomDataConfig, transform: Any, split: str) -> None:
        self.dataset, self.transform, self.split = dataset, transform, split
        self.channels, self.size = config.in_channels, config.image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        where = f"{self.split} image {index}"
        image = image_tensor(image, self.channels, self.size, where)
        return self.transform(image), as_label(label, where)


def tensor_transforms(config: CustomDataConfig) -> tuple[Any, Any]:
    """The training and evaluation transforms of a uint8 image tensor: (training only)
    crop and flip, then to floats in [0, 1], normalised, then (training only) erasing."""
    from torchvision import transforms

    to_float = [transforms.ConvertImageDtype(torch.float32),
                transforms.Normalize(config.mean, config.std)]  # fmt: skip
    before, after = augmentations(config)
    return transforms.Compose(before + to_float + after), transforms.Compose(to_float)


def worker_splits(config: CustomDataConfig, train_set: Any, test_set: Any, seed: int,
                  device: torch.device, shard: Shard) -> DataSplits:  # fmt: skip
    classes = class_names(config, (train_set, test_set), None)
    stats = None
    if config.mean is None or config.std is None:
        count = min(len(train_set), STATS_SAMPLE)
        sample = Subset(train_set, torch.linspace(0, len(train_set) - 1, count).long().tolist())
        stats = channel_stats(decode(sample, config, "train")[0])
    config = settled(config, classes, len(train_set), stats)
    train_transform, eval_transform = tensor_transforms(config)
    sampling = config.sampling
    train_labels, test_labels = known_targets(train_set), known_targets(test_set)
    test = ImagesOf(test_set, config, eval_transform, "test")
    test_index = limited(torch.arange(len(test)), test_labels, config.limit_test, sampling)
    test = Subset(test, test_index.tolist())
    if config.val_size > 0:
        train_index, val_index = split_indices(train_labels, len(train_set), config.val_size,
                                               "custom", sampling)  # fmt: skip
        val = ImagesOf(train_set, config, eval_transform, "train")
        val = Subset(val, limited(val_index, train_labels, config.limit_test, sampling).tolist())
    else:
        train_index, val = torch.arange(len(train_set)), test
    train_index = limited(train_index, train_labels, config.limit_train, sampling)
    train = Subset(ImagesOf(train_set, config, train_transform, "train"), train_index.tolist())
    info = DatasetInfo("custom", config.in_channels, len(classes), config.image_size, classes)
    splits = loader_splits(config, (train, val, test), info, stream_seed(seed, "data"), device,
                           shard)  # fmt: skip
    splits.resolved = resolved_values(config)
    return splits
