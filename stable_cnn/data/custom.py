"""``data=custom``: datasets of your own, from the callable ``data._target_`` names.

It is called with the ``+data.KEY=VALUE`` keys and returns ``(train, test)``: two
map-style datasets (``len`` and ``[i]``) of ``(image, label)`` pairs. An image is a
tensor ``(C, H, W)`` with values in [0, 1] (or uint8), a NumPy array, or a PIL image; a
label is an integer; a dataset's ``classes``, where it has one, names the classes, and
its ``targets``, where it has them, list the labels (so that limits and the hold-out
keep every class in proportion without reading an image).

What the config leaves null is settled from the data: channels from a sample of the
training images (colour if any is), the size from the first, the classes from
``classes`` (else the labels), mean and std from the training images. The images the
run uses (``data.limit_*`` applied first) are decoded once, in parallel, into uint8
tensors and augmented a batch at a time (tensors.py), as the built-in datasets are:
held in memory where they fit in what the job may use, host and GPU, else read from a
file the first run decodes every image into (image_cache.py; ``data.cache``); with
``data.cache=none``, image by image through DataLoader workers (loaders.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from stable_cnn.config import CustomDataConfig, DataConfig
from stable_cnn.data.decode import (
    ChannelStats,
    as_label,
    decode,
    image_tensor,
    streamed_stats,
)
from stable_cnn.data.image_cache import CachedImages, Part, cached_dataset, chosen_cache
from stable_cnn.data.loaders import augmentations, loader_splits
from stable_cnn.data.splits import (
    ONE_PROCESS,
    DatasetInfo,
    DataSplits,
    Shard,
    limited,
    split_indices,
)
from stable_cnn.data.tensors import parts_as_splits
from stable_cnn.errors import ConfigError, DataError
from stable_cnn.system.imports import accepted, find_callable
from stable_cnn.system.seeding import stream_seed

log = logging.getLogger("stable_cnn")

STATS_SAMPLE = 10_000  # the DataLoader way: mean and std from this many training images at most
STATS_BYTES = 512 * 2**20  # and from at most this many bytes of them
DECODE_BYTES = 32 * 2**20  # images of a sample decoded at once (uint8) for the statistics
SHAPE_SAMPLE = 16  # training images that settle the channels


def custom_splits(
    config: CustomDataConfig,
    seed: int,
    device: torch.device,
    shard: Shard = ONE_PROCESS,
    train_device: torch.device | None = None,
    test_only: bool = False,
) -> DataSplits:
    """The user's datasets cut into train, val and test, decoded into memory, or into a
    file, or read image by image, as data.cache says. ``seed`` is the run's;
    ``train_device`` as for the built-in datasets; ``test_only`` (evaluating a checkpoint
    whose record settled the rest): only the test images are decoded, and the splits'
    train is None."""
    train_set, test_set = open_datasets(config)
    config = settle_shape(config, train_set)
    chosen = choose_images(config, train_set, test_set)
    # auto settled and recorded, so that a resumed run goes the same way
    config = replace(config, cache=chosen_cache(config, chosen.count(test_only), device))
    if config.cache == "none":
        return worker_splits(config, train_set, test_set, chosen, seed, device, shard)
    return decoded_splits(
        config, (train_set, test_set), chosen, seed, device, shard, train_device, test_only
    )


def custom_cache(config: CustomDataConfig, device: torch.device, copies: int = 1) -> str:
    """data.cache for the images a run of ``config`` uses, ``copies`` of them (one per
    process on this machine): see chosen_cache."""
    train_set, test_set = open_datasets(config)
    config = settle_shape(config, train_set)
    images = choose_images(config, train_set, test_set).count()
    return chosen_cache(config, images, device, copies)


@dataclass(frozen=True)
class ChosenImages:
    """Which images of the user's datasets a run uses (indices, limits applied)."""

    train: torch.Tensor
    val: torch.Tensor  # of the training dataset; empty: validate on the test split
    test: torch.Tensor
    train_labels: torch.Tensor | None  # the datasets' ``targets``, where they list them
    test_labels: torch.Tensor | None

    def count(self, test_only: bool = False) -> int:
        return len(self.test) if test_only else len(self.train) + len(self.val) + len(self.test)


def choose_images(config: CustomDataConfig, train_set: Any, test_set: Any) -> ChosenImages:
    """The hold-out and the limits, drawn as data.sampling says before any image is read
    (stratified by the datasets' ``targets``; without them, a seeded random sample)."""
    sampling = config.sampling
    train_labels, test_labels = known_targets(train_set), known_targets(test_set)
    if config.val_size > 0:
        train_index, val_index = split_indices(
            train_labels, len(train_set), config.val_size, "custom", sampling
        )
    else:
        train_index, val_index = torch.arange(len(train_set)), torch.arange(0)
    return ChosenImages(
        limited(train_index, train_labels, config.limit_train, sampling),
        limited(val_index, train_labels, config.limit_test, sampling),
        limited(torch.arange(len(test_set)), test_labels, config.limit_test, sampling),
        train_labels,
        test_labels,
    )


def open_datasets(config: CustomDataConfig) -> tuple[Any, Any]:
    """The callable's (train, test), checked to be two datasets with images in them."""
    where = f"data._target_={config._target_}"
    load = find_callable(config._target_, "data._target_")
    offered = {"root": config.root or None, "download": config.download}
    offered = {key: value for key, value in offered.items() if value is not None}  # the set ones
    taken = accepted(load, offered)
    refused = [key for key in ("root", "download") if key in offered and key not in taken]
    for key in [key for key in refused if offered[key] is not False][:1]:  # False: no harm
        raise ConfigError(
            f"data.{key}={offered[key]} is set but {config._target_} takes no {key!r}: "
            f"unset it, and give your callable its own arguments as +data.KEY=VALUE"
        )
    try:
        returned = load(**taken, **config.kwargs)
    except TypeError as err:
        raise ConfigError(
            f"{where}: {err}: it is called with the +data.KEY values as keyword arguments"
        ) from None
    if not (isinstance(returned, (tuple, list)) and len(returned) == 2):
        raise DataError(
            f"{where} returned a {type(returned).__name__}: it must return "
            f"(train, test), two datasets of (image, label) pairs"
        )
    for split, dataset in zip(("train", "test"), returned, strict=True):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise DataError(
                f"{where}: its {split} dataset ({type(dataset).__name__}) has no "
                f"len() and [i]: return map-style datasets"
            )
        if len(dataset) == 0:
            raise DataError(f"{where}: its {split} dataset is empty")
    return returned[0], returned[1]


def settle_shape(config: CustomDataConfig, train_set: Any) -> CustomDataConfig:
    """The config with what was left null settled: channels from a sample of training
    images (colour if any of them is: grey converts to it without loss), the size from
    the first, the validation hold-out a tenth of the training images."""
    val_size = config.val_size if config.val_size is not None else max(1, len(train_set) // 10)
    config = replace(config, val_size=val_size)
    if config.in_channels is not None and config.image_size is not None:
        return config
    spread = torch.linspace(0, len(train_set) - 1, min(SHAPE_SAMPLE, len(train_set))).long()
    shapes = [
        image_tensor(train_set[i][0], None, None, f"training image {i}").shape
        for i in spread.unique().tolist()
    ]
    _, height, width = shapes[0]
    if config.image_size is None and height != width:
        raise DataError(
            f"data=custom: the first training image is {height}x{width}, not square: "
            f"set data.image_size=N to resize every image to NxN"
        )
    colours = {shape[0] for shape in shapes}
    in_channels = config.in_channels or max(colours)
    if len(colours) > 1 and config.in_channels is None:
        grey = sum(shape[0] == 1 for shape in shapes)
        log.info(
            "data=custom: %d of %d sampled training images are greyscale, the others "
            "colour: every image is converted to %d channels (data.in_channels=1 for "
            "grey)",
            grey,
            len(shapes),
            in_channels,
        )
    shaped = replace(config, in_channels=in_channels, image_size=config.image_size or height)
    shaped.check_shape()
    return shaped


def class_names(
    config: CustomDataConfig, datasets: tuple[Any, Any], labels: torch.Tensor | None
) -> tuple[str, ...]:
    """The classes: the train dataset's ``classes``, else numbered up to data.num_classes,
    else up to the largest of ``labels`` (those of both splits)."""
    named = getattr(datasets[0], "classes", None)
    if named is not None:
        names = tuple(str(name) for name in named)
        if config.num_classes is not None and config.num_classes != len(names):
            raise DataError(
                f"data.num_classes={config.num_classes} but the train dataset has "
                f"{len(names)} classes: set data.num_classes=null"
            )
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
            "data.num_classes=N (or data.cache=memory, which reads every label)"
        )
    return torch.cat([torch.as_tensor(t).flatten() for t in targets])


def known_targets(dataset: Any) -> torch.Tensor | None:
    """A dataset's labels where it lists them (``targets``, as torchvision's do), so that
    limits and the hold-out keep every class in proportion without reading an image."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        labels = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):  # names, ragged lists: not labels we can use
        return None
    if labels.ndim != 1 or len(labels) != len(dataset) or labels.is_floating_point():
        return None  # one integer per image, or none at all (multi-label targets are not)
    return labels.long()


def check_labels(labels: torch.Tensor, classes: int, split: str, index: torch.Tensor) -> None:
    """One line naming the first image (``index``: the images' indices in the dataset)
    whose label is outside 0..classes-1."""
    outside = ((labels < 0) | (labels >= classes)).nonzero()
    if len(outside):
        first = int(outside[0])
        raise label_outside(f"{split} image {int(index[first])}", int(labels[first]), classes)


def label_outside(where: str, label: int, classes: int) -> DataError:
    return DataError(
        f"data=custom: {where} has label {label}, outside 0..{classes - 1} for {classes} "
        f"classes: fix the labels or data.num_classes"
    )


def settled(
    config: CustomDataConfig,
    classes: tuple[str, ...],
    stats: tuple[list[float], list[float]] | None,
) -> CustomDataConfig:
    """The config with every null settled: classes, mean and std (the shape and the
    hold-out are, by settle_shape)."""
    mean, std = (config.mean, config.std) if stats is None else stats
    done = replace(config, num_classes=len(classes), mean=mean, std=std)
    done.check_shape()
    return done


def resolved_values(config: CustomDataConfig) -> dict[str, Any]:
    """What the run settled, for its log and its checkpoint's record."""
    keys = ("in_channels", "image_size", "num_classes", "val_size", "mean", "std", "cache")
    return {key: getattr(config, key) for key in keys}


def decoded_splits(
    config: CustomDataConfig,
    datasets: tuple[Any, Any],
    chosen: ChosenImages,
    seed: int,
    device: torch.device,
    shard: Shard,
    train_device: torch.device | None,
    test_only: bool = False,
) -> DataSplits:
    """The chosen images decoded into memory, or into the cache file (data.cache=disk:
    the training images then read from it a batch at a time), checked, and cut into
    splits (the test split alone with ``test_only``)."""
    if config.cache == "disk":  # in the file's order, which ``chosen`` now follows
        train, val, test, chosen = cached_chosen(datasets, chosen, config, test_only)
    else:
        train, val, test = decode_chosen(datasets, chosen, config, test_only)
    decoded = [part for part in (train, val, test) if part is not None]
    listed = [t for t in (chosen.train_labels, chosen.test_labels) if t is not None]
    seen = [*listed, *(labels for _, labels in decoded)]  # all, where the datasets list them
    classes = class_names(config, datasets, torch.cat(seen))
    parts = (
        (train, chosen.train, "train"),
        (val, chosen.val, "train"),
        (test, chosen.test, "test"),
    )
    for part, index, split in parts:
        if part is not None:
            check_labels(part[1], len(classes), split, index)
    stats = None
    if config.mean is None or config.std is None:  # from a sample where train is not decoded
        stats = (
            streamed_stats(train[0]) if train else sample_stats(datasets[0], chosen.train, config)
        )
    config = settled(config, classes, stats)
    splits = parts_as_splits(config, train, val, test, classes, device, seed, shard, train_device)
    splits.resolved = resolved_values(config)
    return splits


def decode_chosen(
    datasets: tuple[Any, Any], chosen: ChosenImages, config: CustomDataConfig, test_only: bool
) -> tuple[Part | None, Part | None, Part]:
    """The chosen train, val and test images, decoded (train and val: None with
    ``test_only``; val: None where the run validates on the test split)."""
    train_set, test_set = datasets
    training = 0 if test_only else len(chosen.train) + len(chosen.val)
    log.info("data custom: decoding %d + %d images into memory", training, len(chosen.test))
    test = decode(test_set, chosen.test, config, "test")
    if test_only:
        return None, None, test
    train = decode(train_set, chosen.train, config, "train")
    val = decode(train_set, chosen.val, config, "train") if len(chosen.val) else None
    return train, val, test


def cached_chosen(
    datasets: tuple[Any, Any], chosen: ChosenImages, config: CustomDataConfig, test_only: bool
) -> tuple[Part | None, Part | None, Part, ChosenImages]:
    """The chosen train, val and test images from the cache files of the two datasets
    (every image of each, decoded the first time; train read a batch at a time), and
    the chosen images' indices in the order the parts hold them."""

    def cached(split: str) -> CachedImages:
        dataset = datasets[split == "test"]

        def decode_items(items: list[int]) -> Part:
            return decode(dataset, torch.as_tensor(items), config, split)

        return cached_dataset(dataset, split, config, decode_items)

    test, test_index = cached("test").part(chosen.test)
    if test_only:
        return None, None, test, replace(chosen, test=test_index)
    train_cache = cached("train")
    train, train_index = train_cache.part(chosen.train, block_rows=config.batch_size * 32)
    val, val_index = train_cache.part(chosen.val) if len(chosen.val) else (None, chosen.val)
    return train, val, test, replace(chosen, train=train_index, val=val_index, test=test_index)


class ImagesOf(Dataset):
    """A user's dataset image by image as the DataLoader way wants it: uint8 (C, H, W) at
    the run's channels and size, then ``transform`` (augmentation and normalisation);
    a label outside 0..classes-1 is one line naming the image."""

    def __init__(self, dataset: Any, config: CustomDataConfig, transform: Any, split: str) -> None:
        self.dataset, self.transform, self.split = dataset, transform, split
        self.channels, self.size = config.in_channels, config.image_size
        self.classes = config.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        where = f"{self.split} image {index}"
        image = image_tensor(image, self.channels, self.size, where)
        label = as_label(label, where)
        if not 0 <= label < self.classes:  # on a GPU, cross-entropy would assert on the device
            raise label_outside(where, label, self.classes)
        return self.transform(image), label


def sample_stats(
    train_set: Any, index: torch.Tensor, config: DataConfig
) -> tuple[list[float], list[float]]:
    """Mean and std from at most STATS_SAMPLE of the training images ``index`` (and at
    most STATS_BYTES of them), spread evenly, decoded a chunk at a time."""
    per_image = config.in_channels * config.image_size**2
    count = max(1, min(len(index), STATS_SAMPLE, STATS_BYTES // per_image))
    sample = index[torch.linspace(0, len(index) - 1, count).long()]
    stats = ChannelStats(config.in_channels)
    for chunk in sample.split(max(1, DECODE_BYTES // per_image)):
        stats.add(decode(train_set, chunk, config, "train")[0])
    return stats.result()


def tensor_transforms(config: CustomDataConfig) -> tuple[Any, Any]:
    """The training and evaluation transforms of a uint8 image tensor: (training only)
    crop and flip, then to floats in [0, 1], normalised, then (training only) erasing."""
    from torchvision import transforms

    to_float = [
        transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize(config.mean, config.std),
    ]
    before, after = augmentations(config)
    return transforms.Compose(before + to_float + after), transforms.Compose(to_float)


def worker_splits(
    config: CustomDataConfig,
    train_set: Any,
    test_set: Any,
    chosen: ChosenImages,
    seed: int,
    device: torch.device,
    shard: Shard,
) -> DataSplits:
    """The chosen images through DataLoader workers, decoded as they are needed; labels
    the datasets list are checked now, the others as each image is read."""
    classes = class_names(config, (train_set, test_set), None)
    for labels, index, split in (
        (chosen.train_labels, chosen.train, "train"),
        (chosen.train_labels, chosen.val, "train"),
        (chosen.test_labels, chosen.test, "test"),
    ):
        if labels is not None:
            check_labels(labels[index], len(classes), split, index)
    stats = None
    if config.mean is None or config.std is None:
        stats = sample_stats(train_set, chosen.train, config)
    config = settled(config, classes, stats)
    train_transform, eval_transform = tensor_transforms(config)
    test = Subset(ImagesOf(test_set, config, eval_transform, "test"), chosen.test.tolist())
    val = test
    if len(chosen.val):
        val = Subset(ImagesOf(train_set, config, eval_transform, "train"), chosen.val.tolist())
    train = Subset(ImagesOf(train_set, config, train_transform, "train"), chosen.train.tolist())
    info = DatasetInfo("custom", config.in_channels, len(classes), config.image_size, classes)
    splits = loader_splits(
        config, (train, val, test), info, stream_seed(seed, "data"), device, shard
    )
    splits.resolved = resolved_values(config)
    return splits
