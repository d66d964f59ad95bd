"""``data=image_folder``: images in class folders, decoded and augmented per image in
DataLoader workers (the classic path, for data that does not fit in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from stable_cnn.config import DataConfig
from stable_cnn.data.loaders import (
    ShuffledLoader,
    evaluation_share,
    leave_stop_signals_to_the_trainer,
)
from stable_cnn.data.splits import (
    ONE_PROCESS,
    DatasetInfo,
    DataSplits,
    Shard,
    check_batch_size,
    first_n,
    split_indices,
)
from stable_cnn.errors import DataError
from stable_cnn.system.hardware import loader_workers, usable_cores


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
    workers = config.num_workers
    if workers is None:
        workers = loader_workers(usable_cores())
    pin_memory = device.type == "cuda"  # page-locked batches copy to the GPU asynchronously
    train_set, val_set, test_set, classes = folder_datasets(config)
    check_batch_size(config, len(train_set), shard.count)

    def loader(dataset: Any) -> DataLoader:
        return DataLoader(
            evaluation_share(dataset, config.eval_batch_size, shard),
            batch_size=config.eval_batch_size,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            worker_init_fn=leave_stop_signals_to_the_trainer,
        )

    test = loader(test_set)
    val = test if val_set is test_set else loader(val_set)
    info = DatasetInfo("image_folder", config.in_channels, len(classes), config.image_size, classes)
    root = Path(config.root).expanduser()
    return DataSplits(
        ShuffledLoader(train_set, config.batch_size, workers, seed, shard, pin_memory),
        val,
        test,
        info,
        len(train_set),
        len(val_set),
        len(test_set),
        val_is_test=val_set is test_set,
        val_is_test_reason=(
            f"{root} has no test/ folder: val/ is both the validation and the test set, so "
            f"test accuracy is optimistic; add a test/ folder, or hold validation images out "
            f"of train/ with data.val_size=N"
        ),
    )


def folder_transforms(config: DataConfig) -> tuple[Any, Any]:
    """The training and the evaluation transforms: channels and size as the model wants
    them, then (training only) crop, flip and, after normalising, random erasing."""
    from torchvision import transforms

    size = config.image_size
    convert = [transforms.Grayscale(1)] if config.in_channels == 1 else []
    convert += [transforms.Resize((size, size))]
    to_tensor = [transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
    augment = []
    if config.augment:
        augment.append(transforms.RandomCrop(size, padding=config.crop_padding))
        if config.flip:
            augment.append(transforms.RandomHorizontalFlip())
    erase = []
    if config.augment and config.erase_prob > 0:  # after Normalize: value 0 is the mean
        erase.append(transforms.RandomErasing(
            config.erase_prob, tuple(config.erase_scale), tuple(config.erase_ratio), value=0
        ))  # fmt: skip
    return transforms.Compose(convert + augment + to_tensor + erase), transforms.Compose(
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

    def first(dataset: Any, index: torch.Tensor, limit: int | None) -> Subset:
        return Subset(dataset, first_n(index, limit).tolist())

    test_set = first(test_set, torch.arange(len(test_set)), config.limit_test)
    if config.val_size > 0:
        train_index, val_index = split_indices(len(train_set), config.val_size, "image_folder")
        val_set = first(open_folder(root, "train", eval_transform), val_index, config.limit_test)
        train_set = Subset(train_set, train_index.tolist())
    elif has_test:
        val_set = first(val_set, torch.arange(len(val_set)), config.limit_test)
    else:
        val_set = test_set  # no test/ folder: val/ serves as both
    train_set = first(train_set, torch.arange(len(train_set)), config.limit_train)
    return train_set, val_set, test_set, classes
