"""``data=image_folder``: images in class folders. With ``data.cache=memory`` each image
the run uses is decoded once into uint8 at the training size and channels, and the run
trains from there as it does on Fashion-MNIST (tensors.py: whole batches augmented on
the device, exact resume); with ``disk`` each folder is decoded once into a file that
later runs read (image_cache.py), the training batches read from it as they are
needed; with ``none`` images are decoded and augmented one at a time in DataLoader
workers every epoch (loaders.py). ``auto`` takes memory where the decoded images fit
(image_cache.py's sizing rule), else disk, else none. Mean and std left null are computed
from the training images."""

from __future__ import annotations

import logging
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from stable_cnn.config import ImageFolderConfig
from stable_cnn.data.custom import sample_stats
from stable_cnn.data.decode import image_tensor, streamed_stats
from stable_cnn.data.image_cache import Part, cached_folder, chosen_cache
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
from stable_cnn.errors import DataError
from stable_cnn.system.seeding import stream_seed

log = logging.getLogger("stable_cnn")


def image_folder_splits(
    config: ImageFolderConfig,
    seed: int,
    device: torch.device,
    shard: Shard = ONE_PROCESS,
    train_device: torch.device | None = None,
    test_only: bool = False,
) -> DataSplits:
    """The folders' images cut into train, val and test, decoded into memory or read
    image by image as data.cache says. ``seed`` is the run's; ``train_device`` and
    ``test_only`` as for the built-in datasets (``test_only``: the checkpoint's record
    settled the rest, and only the test images are decoded)."""
    root = Path(config.root).expanduser()
    val_is_test = (
        f"{root} has no test/ folder: val/ is both the validation and the test set, so "
        f"test accuracy is optimistic; add a test/ folder, or hold validation images out "
        f"of train/ with data.val_size=N"
    )
    train_set, val_set, test_set, classes = folder_datasets(config)
    training = len(train_set) + (0 if val_set is test_set else len(val_set))
    count = len(test_set) + (0 if test_only else training)
    config = replace(config, cache=chosen_cache(config, count, device))
    if config.cache in ("memory", "disk"):
        datasets = (None, None, test_set) if test_only else (train_set, val_set, test_set)
        splits, config = decoded_splits(
            config, datasets, classes, seed, device, shard, train_device
        )
    else:
        if config.mean is None or config.std is None:
            config = with_stats(
                config, *sample_stats(train_set.dataset, index_of(train_set), config)
            )
        train_transform, eval_transform = folder_transforms(config)  # on the folders read
        train_set.dataset.transform = train_transform  # held-out val has a folder of its own
        for subset in (val_set, test_set):
            subset.dataset.transform = eval_transform
        info = DatasetInfo(
            "image_folder", config.in_channels, len(classes), config.image_size, classes
        )
        splits = loader_splits(
            config,
            (train_set, val_set, test_set),
            info,
            stream_seed(seed, "data"),
            device,
            shard,
            val_is_test_reason=val_is_test,
        )
    if splits.val_is_test:
        splits.val_is_test_reason = val_is_test
    splits.resolved = {
        "num_classes": len(classes),
        "cache": config.cache,
        "mean": config.mean,
        "std": config.std,
    }
    return splits


def folder_cache(config: ImageFolderConfig, device: torch.device, copies: int = 1) -> str:
    """data.cache for the images a run of ``config`` uses, ``copies`` of them (one per
    process on this machine): see chosen_cache."""
    train_set, val_set, test_set, _ = folder_datasets(config)
    images = len(train_set) + len(test_set) + (0 if val_set is test_set else len(val_set))
    return chosen_cache(config, images, device, copies)


def decoded_splits(
    config: ImageFolderConfig,
    datasets: tuple[Subset | None, Subset | None, Subset],
    classes: tuple[str, ...],
    seed: int,
    device: torch.device,
    shard: Shard,
    train_device: torch.device | None,
) -> tuple[DataSplits, ImageFolderConfig]:
    """Every image the run uses decoded once into uint8 (N, C, H, W), then the tensor
    path: in memory, or (disk) the training images read from the cache file a batch at a
    time and validated and tested from memory; validation on the test images where they
    are the same set (train and val None: a checkpoint tested, the test images alone);
    and the config with its mean and std."""
    train_set, val_set, test_set = datasets
    separate_val = val_set is not None and val_set is not test_set
    on_disk = config.cache == "disk"
    log.info(
        "data image_folder: %d + %d + %d images (data.cache=%s)",
        0 if train_set is None else len(train_set),
        len(val_set) if separate_val else 0,
        len(test_set),
        config.cache,
    )

    def decoded(subset: Subset | None, training: bool = False) -> Part | None:
        if subset is None:
            return None
        if not on_disk:
            return decode_files(subset, config)
        folder = subset.dataset  # the folder's cache, built once, read by every later run
        cached = cached_folder(
            folder,
            Path(folder.root).name,
            config,
            lambda items: decode_files(Subset(folder, items), config),
        )
        return cached.part(index_of(subset), config.batch_size * 32 if training else None)[0]

    started = time.perf_counter()
    train, test = decoded(train_set, training=True), decoded(test_set)
    val = decoded(val_set) if separate_val else None
    log.info("data image_folder: images ready in %.1f s", time.perf_counter() - started)
    if train is not None and (config.mean is None or config.std is None):
        config = with_stats(config, *streamed_stats(train[0]))
    splits = parts_as_splits(config, train, val, test, classes, device, seed, shard, train_device)
    return splits, config


def decode_files(subset: Subset, config: ImageFolderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A folder's images ``subset`` as one uint8 tensor (N, C, H, W) at the run's channels
    and size, and their labels: in data.num_workers processes where there are many
    (torchvision's decoders hold the GIL, so threads would take turns), in order."""
    files = FolderFiles(subset, config.in_channels, config.image_size)
    images = torch.empty((len(files), files.channels, files.size, files.size), dtype=torch.uint8)
    labels = torch.empty(len(files), dtype=torch.int64)
    workers = (config.num_workers or 0) if len(files) >= PARALLEL_FROM else 0
    if workers < 2:
        for position in range(len(files)):
            images[position], labels[position] = files[position]
        return images, labels
    global DECODING
    DECODING = files  # the forked workers' copy: the file list is not sent to them
    starts = range(0, len(files), DECODE_BATCH)
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), one_thread)
    try:
        for start, (batch_images, batch_labels) in zip(
            starts, pool.map(decode_batch, starts), strict=True
        ):
            images[start : start + len(batch_labels)] = batch_images
            labels[start : start + len(batch_labels)] = batch_labels
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, the batches not begun are not
        DECODING = None
    return images, labels


PARALLEL_FROM = 2048  # images: fewer decode in the process (workers take a second to start)
DECODE_BATCH = 256  # images a worker decodes and sends at once
DECODING: FolderFiles | None = None  # what decode_batch decodes, in a worker


def one_thread() -> None:
    torch.set_num_threads(1)  # a worker per core already


def decode_batch(start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images start..start+DECODE_BATCH of DECODING (in a worker process), and labels."""
    stop = min(start + DECODE_BATCH, len(DECODING))
    images, labels = zip(*(DECODING[position] for position in range(start, stop)), strict=True)
    return torch.stack(images), torch.tensor(labels)


class FolderFiles(Dataset):
    """A folder's images ``subset`` one by one as uint8 (C, H, W) at ``channels`` and
    ``size``, with their labels. torchvision's decoders read JPEG, PNG, GIF and WebP from
    the file's bytes (the pixels PIL gives, at a fifth of its cost per image); other
    formats go through PIL."""

    def __init__(self, subset: Subset, channels: int, size: int) -> None:
        self.samples, self.indices = subset.dataset.samples, subset.indices
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import ImageReadMode, decode_image, read_file
        from torchvision.transforms import functional

        path, label = self.samples[self.indices[position]]
        mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; 0.26 does not
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
            try:
                image = decode_image(read_file(path), mode=mode)
            except RuntimeError:  # a format torchvision does not decode (BMP, TIFF), or none
                image = None
        if image is None or image.dtype != torch.uint8:  # 16-bit PNGs come as uint16
            image = image_tensor(read_image(path), self.channels, self.size, path)
        if tuple(image.shape[1:]) != (self.size, self.size):
            image = functional.resize(image, [self.size, self.size], antialias=True)
        return image, label


def with_stats(config: ImageFolderConfig, mean: list[float], std: list[float]) -> ImageFolderConfig:
    """The config with mean and std where it left them null (values given still win)."""
    log.info("data image_folder: mean %s, std %s (from the training images)", mean, std)
    return replace(config, mean=config.mean or mean, std=config.std or std)


def index_of(subset: Subset) -> torch.Tensor:
    return torch.as_tensor(subset.indices, dtype=torch.int64)


def folder_transforms(config: ImageFolderConfig) -> tuple[Any, Any]:
    """The training and the evaluation transforms: channels and size as the model wants
    them, then (training only) crop, flip and, after normalising, random erasing."""
    from torchvision import transforms

    size = config.image_size
    convert = [transforms.Grayscale(1)] if config.in_channels == 1 else []
    convert += [transforms.Resize((size, size))]
    to_tensor = [transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
    before, after = augmentations(config)
    return transforms.Compose(convert + before + to_tensor + after), transforms.Compose(
        convert + to_tensor
    )


def open_folder(root: Path, split: str) -> Any:
    """root/split as a torchvision ImageFolder, or one DataError line saying what is wrong."""
    from torchvision import datasets

    path = root / split
    if not path.is_dir():
        raise DataError(
            f"image_folder: {path} does not exist: data.root must hold train/ and val/ "
            f"folders with one subfolder of images per class"
        )
    try:  # every image decoded as RGB; data.in_channels=1 makes it grey afterwards
        return datasets.ImageFolder(str(path), loader=read_image)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"image_folder: no images in {path} ({err})") from None


def read_image(path: str) -> Any:
    """One image file as an RGB PIL image (torchvision's loader), or one line naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(
            f"image_folder: {path} cannot be read as an image ({err}): remove or replace it"
        ) from None


def folder_datasets(config: ImageFolderConfig) -> tuple[Any, Any, Any, tuple[str, ...]]:
    """The train, validation and test datasets and the class names: train/ and val/ (and
    test/ where it exists, else val/ is the test set too), validation held out of train/
    with data.val_size=N, the limits applied; the class folders checked alike. An item is
    the decoded PIL image as the file holds it (the DataLoader path sets transforms)."""
    root = Path(config.root).expanduser()
    train_set = open_folder(root, "train")
    classes = tuple(train_set.classes)
    if config.num_classes is not None and config.num_classes != len(classes):
        raise DataError(
            f"data.num_classes={config.num_classes} but {root / 'train'} has {len(classes)} "
            f"class folders: set data.num_classes=null to infer it"
        )
    val_set = open_folder(root, "val")
    has_test = (root / "test").is_dir()
    test_set = open_folder(root, "test") if has_test else val_set
    for split, dataset in (("val", val_set), ("test", test_set)):
        if tuple(dataset.classes) != classes:
            raise DataError(
                f"image_folder: {root / split} has classes {list(dataset.classes)} but "
                f"{root / 'train'} has {list(classes)}: both need the same class folders"
            )

    def sample(dataset: Any, index: torch.Tensor | None, limit: int | None) -> Subset:
        labels = torch.tensor(dataset.targets)  # the folders say them: no image is read
        index = torch.arange(len(labels)) if index is None else index
        return Subset(dataset, limited(index, labels, limit, config.sampling).tolist())

    train_index = None
    test_set = sample(test_set, None, config.limit_test)
    if config.val_size > 0:
        train_labels = torch.tensor(train_set.targets)
        train_index, val_index = split_indices(
            train_labels, len(train_labels), config.val_size, "image_folder", config.sampling
        )
        val_set = sample(open_folder(root, "train"), val_index, config.limit_test)
    elif has_test:
        val_set = sample(val_set, None, config.limit_test)
    else:
        val_set = test_set  # no test/ folder: val/ serves as both
    train_set = sample(train_set, train_index, config.limit_train)
    return train_set, val_set, test_set, classes
