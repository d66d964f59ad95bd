"""``data=image_folder``: images in class folders, decoded and augmented per image in
DataLoader workers (the classic path, for data that does not fit in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from stable_cnn.config import DataConfig
from stable_cnn.data.loaders import augmentations, loader_splits
from stable_cnn.data.splits import (
    ONE_PROCESS,
    DatasetInfo,
    DataSplits,
    Shard,
    limited,
    split_indices,
)
from stable_cnn.errors import DataError


def image_folder_splits(
    config: DataConfig,
    seed: int,
    device: torch.device,
    shard: Shard = ONE_PROCESS,
) -> DataSplits:
    """The classic path: per-image decode and transforms in DataLoader workers. ``seed``
    is the data stream's; ``device`` the run's (batches are pinned for a GPU); ``shard``
    this process's share when several processes train. ``data.num_workers=null`` is
    sized from the cores this process may use."""
    train_set, val_set, test_set, classes = folder_datasets(config)
    info = DatasetInfo("image_folder", config.in_channels, len(classes), config.image_size, classes)
    root = Path(config.root).expanduser()
    splits = loader_splits(
        config,
        (train_set, val_set, test_set),
        info,
        seed,
        device,
        shard,
        val_is_test_reason=(
            f"{root} has no test/ folder: val/ is both the validation and the test set, so "
            f"test accuracy is optimistic; add a test/ folder, or hold validation images out "
            f"of train/ with data.val_size=N"
        ),
    )
    if config.num_classes is None:  # settled by the class folders
        splits.resolved = {"num_classes": len(classes)}
    return splits


def folder_transforms(config: DataConfig) -> tuple[Any, Any]:
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


def open_folder(root: Path, split: str, transform: Any) -> Any:
    """root/split as a torchvision ImageFolder, or one DataError line saying what is wrong."""
    from torchvision import datasets

    path = root / split
    if not path.is_dir():
        raise DataError(
            f"image_folder: {path} does not exist: data.root must hold train/ and val/ "
            f"folders with one subfolder of images per class"
        )
    try:  # ImageFolder decodes every image as RGB; Grayscale makes it 1 channel
        return datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"image_folder: no images in {path} ({err})") from None


def folder_datasets(config: DataConfig) -> tuple[Any, Any, Any, tuple[str, ...]]:
    """The train, validation and test datasets and the class names: train/ and val/ (and
    test/ where it exists, else val/ is the test set too), validation held out of train/
    with data.val_size=N, the limits applied; the class folders checked alike."""
    root = Path(config.root).expanduser()
    train_transform, eval_transform = folder_transforms(config)
    train_set = open_folder(root, "train", train_transform)
    classes = tuple(train_set.classes)
    if config.num_classes is not None and config.num_classes != len(classes):
        raise DataError(
            f"data.num_classes={config.num_classes} but {root / 'train'} has {len(classes)} "
            f"class folders: set data.num_classes=null to infer it"
        )
    val_set = open_folder(root, "val", eval_transform)
    has_test = (root / "test").is_dir()
    test_set = open_folder(root, "test", eval_transform) if has_test else val_set
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
        val_set = sample(open_folder(root, "train", eval_transform), val_index, config.limit_test)
    elif has_test:
        val_set = sample(val_set, None, config.limit_test)
    else:
        val_set = test_set  # no test/ folder: val/ serves as both
    train_set = sample(train_set, train_index, config.limit_train)
    return train_set, val_set, test_set, classes
