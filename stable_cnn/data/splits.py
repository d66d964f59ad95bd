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
        """Stop the splits' DataLoader workers now (in-memory splits have none), and close
        the cache file training batches are read from.

        Workers ignore SIGTERM (see image_folder.py), and multiprocessing's exit handler
        terminates and then joins whichever are still alive: a loader that outlives its
        run (any lingering reference to it will do) would hold the process at exit."""
        for split in (self.train, self.val, self.test):
            stop_workers(getattr(split, "loader", split))
            close = getattr(getattr(split, "images", None), "close", None)
            if close is not None:  # a cache file's rows (FileRows): its file
                close()


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


def split_indices(
    labels: torch.Tensor | None, num_images: int, val_size: int, name: str, sampling: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: ``val_size`` images held out of the training set, the same
    ones for every run; each class in proportion (``sampling=stratified``, where the
    labels are known), else at random."""
    if val_size >= num_images:
        raise DataError(
            f"data.val_size={val_size} leaves no training images ({name} has {num_images} "
            f"training images): lower data.val_size, or set it to 0 to validate on the test set"
        )
    if sampling == "first" or labels is None:  # before 2026-12-02: a seeded permutation
        order = torch.randperm(num_images, generator=torch.Generator().manual_seed(SPLIT_SEED))
        return order[val_size:], order[:val_size]
    val = stratified(torch.arange(num_images), labels, val_size)
    kept = torch.ones(num_images, dtype=torch.bool)
    kept[val] = False
    return kept.nonzero().flatten(), val


def limited(
    index: torch.Tensor, labels: torch.Tensor | None, limit: int | None, sampling: str
) -> torch.Tensor:
    """``limit`` of the images ``index`` (all when None): a seeded sample with each class
    in proportion (``sampling=stratified``; ``labels`` are the whole dataset's, None where
    they are unknown: a seeded random sample), or the first ``limit`` (``first``, the
    rule of runs before 2026-12-02)."""
    if limit is None or limit >= len(index):
        return index
    if sampling == "first":
        return index[:limit]
    if labels is None:
        order = torch.randperm(len(index), generator=torch.Generator().manual_seed(SPLIT_SEED))
        return index[order[:limit].sort().values]
    return stratified(index, labels, limit)


def stratified(index: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` of the images ``index``, sorted: each class's share of them as close to
    its share of ``index`` as whole images allow (largest remainders), drawn with a
    fixed seed, so every run with the same data and count gets the same images."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    classes, per_class = labels[index].unique(return_counts=True)
    exact = per_class.double() * count / len(index)
    quota = exact.floor().long()
    short = count - int(quota.sum())
    # the classes with the largest fractional parts get one image more; ties in a seeded
    # order, so that 5 of 10 balanced classes are not always the first five
    tie_order = torch.randperm(len(classes), generator=generator)
    remainders = (exact - quota)[tie_order]
    quota[tie_order[remainders.argsort(descending=True, stable=True)[:short]]] += 1
    chosen = []
    for label, take in zip(classes.tolist(), quota.tolist(), strict=True):
        members = index[labels[index] == label]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


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
