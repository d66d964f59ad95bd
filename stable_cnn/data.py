"""Datasets -> batches: train, validation and test splits ready for the loop.

Datasets that fit in memory (Fashion-MNIST, MNIST, CIFAR, SVHN, synthetic) are
decoded once into a uint8 tensor on the training device, and ``TensorBatches``
slices, augments and normalises whole batches there. ``image_folder`` data keeps
the classic per-image DataLoader path (image_folder.py).
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stable_cnn.atomic import atomic_write
from stable_cnn.augment import normalize, random_crop, random_erase, random_flip
from stable_cnn.config import DataConfig
from stable_cnn.errors import DataError
from stable_cnn.seeding import stream_seed

# The validation split is drawn with this fixed seed, so every run (any trainer.seed)
# validates on the same images and their val accuracies compare.
SPLIT_SEED = 0

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

TORCHVISION_DATASETS = {
    "fashion_mnist": ("FashionMNIST", "Fashion-MNIST"),
    "mnist": ("MNIST", "MNIST"),
    "cifar10": ("CIFAR10", "CIFAR-10"),
    "cifar100": ("CIFAR100", "CIFAR-100"),
    "svhn": ("SVHN", "SVHN"),
}


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


@dataclass(frozen=True)
class Shard:
    """This process's share of every pass over the data: batch ``index`` of every
    ``count`` (one process: every batch)."""

    index: int = 0
    count: int = 1


ONE_PROCESS = Shard()


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
    ) -> None:
        self.images = images  # (N, C, H, W) uint8
        self.labels = labels  # (N,) int64
        self.batch_size = batch_size
        self.mean = mean.view(1, -1, 1, 1).to(images.device)
        self.std = std.view(1, -1, 1, 1).to(images.device)
        self.train = train  # shuffle, augment, drop the last partial batch
        self.crop_padding = crop_padding
        self.flip = flip
        self.erase = (erase_prob, erase_scale, erase_ratio)  # random erasing, after normalising
        self.generator = generator  # the order: the same seed on every process
        # Crops, flips and erasing: a stream of each process's own (the order's generator
        # itself for a single process, so that one process draws as it always has).
        self.augment_generator = augment_generator or generator
        self.shard = shard
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
            order = torch.randperm(
                len(self.labels), generator=self.generator, device=self.generator.device
            )
            self.order, self.position = order.to(device), 0
        augment = self.augment_generator
        while self.position < len(self):
            start = self.batch_index(self.position) * self.batch_size
            index = self.order[start : start + self.batch_size]
            images = self.images[index]
            if self.train:
                images = random_crop(images, self.crop_padding, augment)
                if self.flip:
                    images = random_flip(images, augment)
            self.position += 1
            images = normalize(images, self.mean, self.std)
            if self.train and self.erase[0] > 0:
                images = random_erase(images, *self.erase, augment)
            yield images, self.labels[index]
        self.order = None  # the epoch is over: the next iteration draws a new order

    def preview(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` images (uint8) augmented as in training, and their labels,
        drawn with a generator of their own: the training stream is left untouched."""
        images = self.images[:count]
        if self.train:
            generator = torch.Generator(device=images.device).manual_seed(seed)
            images = random_crop(images, self.crop_padding, generator)
            if self.flip:
                images = random_flip(images, generator)
        return images, self.labels[:count]

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
        if self.augment_generator is not self.generator:
            self.augment_generator.set_state(state["augment_generator"])
        order = state["order"]
        self.order = None if order is None else order.to(self.images.device)
        self.position = state["position"]


def build_splits(
    config: DataConfig,
    device: torch.device,
    seed: int,
    shard: Shard = ONE_PROCESS,
    train_device: torch.device | None = None,
) -> DataSplits:
    """Load the dataset named by ``config.name`` and cut it into train, val and test batches.
    ``seed`` is the run's seed: the data's random streams derive their own from it.
    ``shard`` is this process's share of each pass when several processes train.
    ``train_device`` is where the training images are kept (default: ``device``): a
    command that only evaluates keeps them off the GPU."""
    run_seed, seed = seed, stream_seed(seed, "data")
    if config.name == "image_folder":
        from stable_cnn.image_folder import image_folder_splits  # imports this module

        return image_folder_splits(config, seed, device, shard)
    train_images, train_labels, class_names = load_tensors(config, train=True)
    test_images, test_labels, _ = load_tensors(config, train=False)
    _check_shape(config, train_images)

    train_index, val_index = split_indices(len(train_labels), config.val_size, config.name)
    train_index = first_n(train_index, config.limit_train)
    check_batch_size(config, len(train_index), shard.count)
    mean, std = torch.tensor(config.mean), torch.tensor(config.std)
    augment_generator = None  # one process: the order's generator augments too
    if shard.count > 1:
        augment_seed = stream_seed(run_seed, f"augment/{shard.index}")
        augment_generator = torch.Generator(device=train_device or device)
        augment_generator.manual_seed(augment_seed)

    train_device = train_device or device

    def batches(images: torch.Tensor, labels: torch.Tensor, train: bool) -> TensorBatches:
        where = train_device if train else device
        return TensorBatches(
            images.to(where),
            labels.to(where),
            config.batch_size if train else config.eval_batch_size,
            mean,
            std,
            train=train,
            crop_padding=config.crop_padding if config.augment else 0,
            flip=config.flip and config.augment,
            generator=torch.Generator(device=where).manual_seed(seed) if train else None,
            erase_prob=config.erase_prob if config.augment else 0.0,
            erase_scale=tuple(config.erase_scale),
            erase_ratio=tuple(config.erase_ratio),
            shard=shard,
            augment_generator=augment_generator if train else None,
        )

    test_index = first_n(torch.arange(len(test_labels)), config.limit_test)
    test = batches(test_images[test_index], test_labels[test_index], train=False)
    if len(val_index) == 0:
        val = test
    else:
        val_index = first_n(val_index, config.limit_test)
        val = batches(train_images[val_index], train_labels[val_index], train=False)
    train = batches(train_images[train_index], train_labels[train_index], train=True)
    info = DatasetInfo(
        config.name, config.in_channels, len(class_names), config.image_size, class_names
    )
    return DataSplits(
        train,
        val,
        test,
        info,
        len(train_index),
        len(val.labels),
        len(test.labels),
        val_is_test=len(val_index) == 0,
    )


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


def _check_shape(config: DataConfig, images: torch.Tensor) -> None:
    _, channels, height, width = images.shape
    if channels != config.in_channels or height != config.image_size or width != height:
        raise DataError(
            f"{config.name} images are {channels}x{height}x{width} but the data config says "
            f"in_channels={config.in_channels}, image_size={config.image_size}: fix the data config"
        )


def load_tensors(config: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """One split as (uint8 images (N, C, H, W), int64 labels (N,), class names)."""
    if config.name == "synthetic":
        return synthetic_tensors(config, train)
    if config.name not in TORCHVISION_DATASETS:
        known = ", ".join([*TORCHVISION_DATASETS, "image_folder", "synthetic"])
        raise DataError(f"data.name={config.name!r} is not a known dataset: use one of {known}")
    dataset = open_torchvision_dataset(config, train)
    if config.name == "svhn":
        images = torch.from_numpy(dataset.data)  # already (N, 3, 32, 32)
        labels = torch.as_tensor(dataset.labels, dtype=torch.int64)
        return images, labels, tuple(str(digit) for digit in range(10))
    images = torch.as_tensor(dataset.data)
    # MNIST family: (N, H, W); CIFAR: (N, H, W, C)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return images.contiguous(), labels, tuple(dataset.classes)


def open_torchvision_dataset(config: DataConfig, train: bool) -> Any:
    """The torchvision dataset, from disk, the system copy, or a download, in that order."""
    import torchvision.datasets as tv

    class_name, pretty = TORCHVISION_DATASETS[config.name]
    dataset_class = getattr(tv, class_name)
    root = Path(config.root).expanduser()
    split = {"split": "train" if train else "test"} if config.name == "svhn" else {"train": train}
    if config.name in ("fashion_mnist", "mnist") and config.system_dir:
        install_idx_files(Path(config.system_dir), root / class_name / "raw")
    try:
        return dataset_class(str(root), download=False, **split)
    except RuntimeError:
        pass  # not on disk
    except ImportError as err:
        raise DataError(f"{pretty} needs an extra package ({err}): pip install scipy") from None
    hint = _missing_data_hint(config, pretty, root)
    if not config.download:
        raise DataError(f"{pretty} is not in {root} and data.download=false: {hint}")
    created = not root.exists()
    try:
        return dataset_class(str(root), download=True, **split)
    except Exception as err:  # torchvision raises many kinds when offline
        if created:
            shutil.rmtree(root, ignore_errors=True)  # leave nothing half-downloaded
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{pretty} is not in {root} and could not be downloaded ({reason}): {hint}"
        ) from None


def _missing_data_hint(config: DataConfig, pretty: str, root: Path) -> str:
    if config.name == "fashion_mnist":
        return (
            "install the offline copy with `apt-get install dataset-fashion-mnist` "
            f"(files in {config.system_dir}), or run with internet access and data.download=true"
        )
    return (
        f"run once with internet access and data.download=true, or copy {pretty} "
        f"into {root} (data.root=... or STABLE_CNN_DATA point elsewhere)"
    )


def install_idx_files(system_dir: Path, raw_dir: Path) -> None:
    """Decompress gzipped IDX files (e.g. Debian's dataset-fashion-mnist) into torchvision's
    ``raw/`` layout. Their checksums differ from torchvision's, so torchvision's own
    download step would reject them; it loads the decompressed files directly.
    Each file is written atomically, so no half file is ever left.
    """
    missing = [name for name in MNIST_FILES if not (raw_dir / name).exists()]
    sources = [system_dir / f"{name}.gz" for name in missing]
    if not missing or not all(source.exists() for source in sources):
        return
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, source in zip(missing, sources, strict=True):
        with atomic_write(raw_dir / name) as out, gzip.open(source, "rb") as packed:
            shutil.copyfileobj(packed, out, length=1 << 20)


def synthetic_tensors(config: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Class templates plus noise: learnable, deterministic, nothing read from disk."""
    classes = config.num_classes or 10
    shape = (config.in_channels, config.image_size, config.image_size)
    templates = torch.randint(0, 256, (classes, *shape), generator=torch.Generator().manual_seed(0))
    count = config.num_train if train else config.num_test
    generator = torch.Generator().manual_seed(1 if train else 2)
    labels = torch.randint(0, classes, (count,), generator=generator)
    noise = torch.randn((count, *shape), generator=generator) * 48
    images = (templates[labels].float() * 0.6 + 50 + noise).clamp(0, 255).to(torch.uint8)
    return images, labels, tuple(f"class_{k}" for k in range(classes))
