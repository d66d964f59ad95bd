"""Datasets that fit in memory, from disk, the system's offline copy or a download,
as uint8 tensors: Fashion-MNIST, MNIST, CIFAR-10/100, SVHN, and a synthetic set for tests."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import torch

from stable_cnn.config import DataConfig, SyntheticDataConfig
from stable_cnn.errors import DataError
from stable_cnn.system.atomic import atomic_write

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


def check_shape(config: DataConfig, images: torch.Tensor) -> None:
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


def synthetic_tensors(
    config: SyntheticDataConfig, train: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
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
