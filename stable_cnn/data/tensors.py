"""In-memory data on the training device: uint8 images decoded once, sliced, augmented
and normalised a whole batch at a time (airbench's loader), shuffled from its own
generator."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stable_cnn.config import DataConfig
from stable_cnn.data.augment import normalize, random_crop, random_erase, random_flip
from stable_cnn.data.datasets import check_shape, load_tensors
from stable_cnn.data.splits import (
    ONE_PROCESS,
    DatasetInfo,
    DataSplits,
    Shard,
    check_batch_size,
    limited,
    split_indices,
)
from stable_cnn.system.seeding import stream_seed


class TensorBatches:
    """Batches sliced from uint8 images held in memory, augmented and normalised per batch.

    Shuffles with ``torch.randperm`` from its own generator, so data order and
    augmentation are reproducible from the seed and independent of model init.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        train: bool,
        crop_padding: int = 0,
        flip: bool = False,
        generator: torch.Generator | None = None,
        erase_prob: float = 0.0,
        erase_scale: tuple[float, float] = (0.02, 0.33),
        erase_ratio: tuple[float, float] = (0.3, 3.3),
        shard: Shard = ONE_PROCESS,
        augment_generator: torch.Generator | None = None,
        device: torch.device | None = None,
        balanced: bool = False,
    ) -> None:
        self.images = images  # (N, C, H, W) uint8 (or FileRows: read from a file by batch)
        self.labels = labels  # (N,) int64, where the images are
        # where batches are augmented and handed out: the images' device, or (images read
        # from a file on the host) the run's, each batch copied there as it is read
        self.device = torch.device(device) if device is not None else images.device
        self.batch_size = batch_size
        self.mean = mean.view(1, -1, 1, 1).to(self.device)
        self.std = std.view(1, -1, 1, 1).to(self.device)
        self.train = train  # shuffle, augment, drop the last partial batch
        self.crop_padding = crop_padding
        self.flip = flip
        self.erase = (erase_prob, erase_scale, erase_ratio)  # random erasing, after normalising
        self.generator = generator  # the order: the same seed on every process
        # Crops, flips and erasing: a stream of each process's own (the order's generator
        # itself for a single process, so that one process draws as it always has).
        self.augment_generator = augment_generator or generator
        self.shard = shard
        # data.sampler=balanced: each image's chance, 1 / its class's count (counted once)
        self.draw_weights = ClassIndex.of(labels) if balanced else None
        self.order: torch.Tensor | None = None  # this epoch's shuffled indices
        self.position = 0  # batches of this epoch already handed out (by this process)

    @property
    def batches_in_all(self) -> int:
        """Batches of the whole pass, all processes together."""
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __len__(self) -> int:
        """This process's batches per pass. Training: the same on every process (each
        takes one batch of every ``shard.count`` in turn; the rest of the shuffled
        images wait for the next epoch). Evaluation: every batch is someone's."""
        total, shard = self.batches_in_all, self.shard
        if self.train:
            return total // shard.count
        return len(range(shard.index, total, shard.count))

    def batch_index(self, position: int) -> int:
        """Which batch of the whole pass is this process's ``position``-th."""
        return position * self.shard.count + self.shard.index

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        if not self.train:
            self.order, self.position = torch.arange(len(self.labels), device=device), 0
        elif self.order is None:  # a new epoch; a resumed one keeps its saved order
            if self.draw_weights is not None:
                order = balanced_draw(self.draw_weights, self.generator)
            else:
                block = getattr(self.images, "block_rows", 0)  # FileRows: reads stay together
                order = shuffled(len(self.labels), self.generator, block)
            self.order, self.position = order.to(device), 0
        augment = self.augment_generator
        while self.position < len(self):
            start = self.batch_index(self.position) * self.batch_size
            index = self.order[start : start + self.batch_size]
            images, labels = self.images[index], self.labels[index]
            if images.device.type != self.device.type:  # read on the host: to the device
                images, labels = on_device(images, self.device), on_device(labels, self.device)
            if self.train:
                images = random_crop(images, self.crop_padding, augment)
                if self.flip:
                    images = random_flip(images, augment)
            self.position += 1
            images = normalize(images, self.mean, self.std)
            if self.train and self.erase[0] > 0:
                images = random_erase(images, *self.erase, augment)
            yield images, labels
        self.order = None  # the epoch is over: the next iteration draws a new order

    def preview(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` images (uint8) augmented as in training, and their labels,
        drawn with a generator of their own: the training stream is left untouched."""
        images, labels = self.images[:count], self.labels[:count]
        if images.device.type != self.device.type:  # read from a file on the host
            images, labels = images.to(self.device), labels.to(self.device)
        if self.train:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            images = random_crop(images, self.crop_padding, generator)
            if self.flip:
                images = random_flip(images, generator)
        return images, labels

    def state_dict(self) -> dict:
        """Where the data stream stands: the RNG, this epoch's order and the next batch."""
        state = {
            "generator": self.generator.get_state(),
            "order": None if self.order is None else self.order.cpu(),
            "position": self.position,
        }
        if self.augment_generator is not self.generator:
            state["augment_generator"] = self.augment_generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.augment_generator is not self.generator and "augment_generator" in state:
            # (absent: saved by one process whose order's generator augmented too)
            self.augment_generator.set_state(state["augment_generator"])
        order = state["order"]
        self.order = None if order is None else order.to(self.images.device)
        self.position = state["position"]


def on_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``; to a GPU through page-locked memory, without waiting."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class ClassIndex:
    """The images grouped by class, for a class-balanced draw (data.sampler=balanced):
    image indices sorted by label, where each class starts among them, its count, and
    the classes present."""

    by_class: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor
    present: torch.Tensor

    @classmethod
    def of(cls, labels: torch.Tensor) -> ClassIndex:
        counts = torch.bincount(labels)  # once per run (it reads the device to size itself)
        starts = counts.cumsum(0) - counts
        present = (counts > 0).nonzero()[:, 0]  # once per run, as above
        return cls(labels.argsort(stable=True), starts, counts, present)


def balanced_draw(index: ClassIndex, generator: torch.Generator) -> torch.Tensor:
    """An epoch's order under data.sampler=balanced: as many draws as images, each a
    class drawn uniformly among those present, then an image uniformly within it (the
    same draw as weights 1 / class count, on the generator's device, with no size limit
    and no float64), from ``generator`` (saved with the run)."""
    total, device = len(index.by_class), generator.device
    classes = index.present[
        torch.randint(len(index.present), (total,), generator=generator, device=device)
    ]
    within = torch.rand(total, generator=generator, device=device) * index.counts[classes]
    offset = within.long().minimum(index.counts[classes] - 1)  # rand's 1 - eps rounds up
    return index.by_class[index.starts[classes] + offset]


def shuffled(count: int, generator: torch.Generator, block: int = 0) -> torch.Tensor:
    """A random order of ``count`` indices; with ``block``, blocks of that many
    consecutive indices in a random order, each block's indices shuffled within it."""
    device = generator.device
    if block <= 0:
        return torch.randperm(count, generator=generator, device=device)
    block_rank = torch.randperm(-(-count // block), generator=generator, device=device)
    within = torch.randperm(count, generator=generator, device=device)
    blocks = torch.arange(count, device=device) // block
    return (block_rank[blocks] * count + within).argsort()


def tensor_splits(
    config: DataConfig,
    device: torch.device,
    run_seed: int,
    shard: Shard = ONE_PROCESS,
    train_device: torch.device | None = None,
) -> DataSplits:
    """A built-in in-memory dataset's splits: validation held out of its training images
    (the same images for every run), the limits applied (see parts_as_splits)."""
    train_images, train_labels, class_names = load_tensors(config, train=True)
    test_images, test_labels, _ = load_tensors(config, train=False)
    check_shape(config, train_images)
    sampling = config.sampling
    train_index, val_index = split_indices(
        train_labels, len(train_labels), config.val_size, config.name, sampling
    )
    train_index = limited(train_index, train_labels, config.limit_train, sampling)
    val_index = limited(val_index, train_labels, config.limit_test, sampling)
    test_index = limited(torch.arange(len(test_labels)), test_labels, config.limit_test, sampling)
    val = (train_images[val_index], train_labels[val_index]) if len(val_index) else None
    return parts_as_splits(
        config,
        (train_images[train_index], train_labels[train_index]),
        val,
        (test_images[test_index], test_labels[test_index]),
        class_names,
        device,
        run_seed,
        shard,
        train_device,
    )


def parts_as_splits(
    config: DataConfig,
    train: tuple[torch.Tensor, torch.Tensor] | None,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    test: tuple[torch.Tensor, torch.Tensor],
    class_names: tuple[str, ...],
    device: torch.device,
    run_seed: int,
    shard: Shard = ONE_PROCESS,
    train_device: torch.device | None = None,
) -> DataSplits:
    """Splits of images already chosen (uint8 (N, C, H, W), int64 labels): training
    batches on ``train_device`` (default ``device``; None: a checkpoint tested, whose
    splits' train is None), validation (None: the test split) and test batches on
    ``device``."""
    test_split = evaluation_batches(config, *test, device, shard)
    val_split = test_split if val is None else evaluation_batches(config, *val, device, shard)
    train_split = None
    if train is not None:
        check_batch_size(config, len(train[1]), shard.count)
        train_split = training_batches(config, *train, train_device or device, run_seed, shard)
    info = DatasetInfo(
        config.name, config.in_channels, len(class_names), config.image_size, class_names
    )
    return DataSplits(
        train_split,
        val_split,
        test_split,
        info,
        0 if train is None else len(train[1]),
        len(val_split.labels),
        len(test_split.labels),
        val_is_test=val is None,
    )


def training_batches(
    config: DataConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    run_seed: int,
    shard: Shard,
) -> TensorBatches:
    """Shuffled, augmented batches: the order from the data stream's seed (the same on
    every process), the augmentation from each process's own stream."""
    # Images read from a file (FileRows) stay on the host, and so do their order and
    # labels: a batch's rows are read there, then copied to ``device`` and augmented.
    kept = torch.device("cpu") if hasattr(images, "block_rows") else device
    augment_generator = None  # one process: the order's generator augments too
    if shard.count > 1 or kept != device:
        augment_generator = torch.Generator(device=device)
        augment_generator.manual_seed(stream_seed(run_seed, f"augment/{shard.index}"))
    order = torch.Generator(device=kept).manual_seed(stream_seed(run_seed, "data"))
    augment = config.augment
    return TensorBatches(
        images.to(kept),
        labels.to(kept),
        config.batch_size,
        torch.tensor(config.mean),
        torch.tensor(config.std),
        train=True,
        crop_padding=config.crop_padding if augment else 0,
        flip=config.flip and augment,
        generator=order,
        erase_prob=config.erase_prob if augment else 0.0,
        erase_scale=tuple(config.erase_scale),
        erase_ratio=tuple(config.erase_ratio),
        shard=shard,
        augment_generator=augment_generator,
        device=device,
        balanced=config.sampler == "balanced",
    )


def evaluation_batches(
    config: DataConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    shard: Shard,
) -> TensorBatches:
    """Every image once, in order, not augmented (this process's share of the batches)."""
    return TensorBatches(
        images.to(device),
        labels.to(device),
        config.eval_batch_size,
        torch.tensor(config.mean),
        torch.tensor(config.std),
        train=False,
        shard=shard,
    )
