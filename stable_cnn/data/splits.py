"""What a dataset is cut into: the train, validation and test splits a run gets, what
the model needs to know about the data, and each process's share of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from stable_cnn.config import DataConfig
from stable_cnn.errors import DataError

# The validation split is drawn with this fixed seed, so every run (any trainer.seed)
# validates on the same images and their val accuracies compare.
SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the logs need to know about the data."""

    name: str
    in_channels: int
    num_classes: int
    image_size: int
    class_names: tuple[str, ...]


@dataclass
class DataSplits:
    train: Any  # (images, labels) batches with state_dict(): TensorBatches or ShuffledLoader
    val: Any
    test: Any
    info: DatasetInfo
    num_train: int
    num_val: int
    num_test: int
    val_is_test: bool  # validation runs on the test split (data.val_size=0)
    # why, for the run log: one line that says what happened and what to do instead
    val_is_test_reason: str = (
        "validating on the test set (data.val_size=0): test accuracy is optimistic; hold "
        "validation images out of the training set with data.val_size=N"
    )
    loader_workers: int = 0  # DataLoader worker processes (0: the data is in memory)
    # data keys left null that the data settled (data=custom: channels, size, classes,
    # mean and std, val_size; data=image_folder: num_classes): the checkpoint records them
    resolved: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Stop the splits' DataLoader workers now (in-memory splits have none).

        Workers ignore SIGTERM (see image_folder.py), and multiprocessing's exit handler
        terminates and then joins whichever are still alive: a loader that outlives its
        run (any lingering reference to it will do) would hold the process at exit."""
        for split in (self.train, self.val, self.test):
            stop_workers(getattr(split, "loader", split))


def stop_workers(loader: Any) -> None:
    """Shut down a DataLoader's persistent workers. DataLoader has no public way to do
    this; dropping the iterator it keeps for them, after asking that iterator to shut
    them down, is what its own clean-up does when garbage-collected."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)  # none without workers
    if shutdown is not None:
        shutdown()
    loader._iterator = None


@dataclass(frozen=True)
class Shard:
    """This process's share of every pass over the data: batch ``index`` of every
    ``count`` (one process: every batch)."""

    index: int = 0
    count: int = 1


ONE_PROCESS = Shard()


def split_indices(num_images: int, val_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold ``val_size`` images out of the training set, the same ones for every run."""
    if val_size >= num_images:
        raise DataError(
            f"data.val_size={val_size} leaves no training images ({name} has {num_images} "
            f"training images): lower data.val_size, or set it to 0 to validate on the test set"
        )
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return order[val_size:], order[:val_size]


def first_n(index: torch.Tensor, limit: int | None) -> torch.Tensor:
    return index if limit is None else index[:limit]


def check_batch_size(config: DataConfig, num_train: int, processes: int = 1) -> None:
    """Every process needs at least one full batch per epoch."""
    if config.batch_size * processes > num_train:
        each = f" per process x {processes} processes" if processes > 1 else ""
        fix = f"lower data.batch_size (to {num_train // processes} at most)"
        if config.limit_train is not None:
            fix += " or raise data.limit_train"
        elif config.val_size > 0:
            fix += f" or hold fewer images out for validation (data.val_size={config.val_size})"
        raise DataError(
            f"data.batch_size={config.batch_size}{each} is larger than the {num_train} "
            f"training images: {fix}"
        )
