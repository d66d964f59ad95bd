"""The run's data: the dataset named by ``data.name`` cut into train, validation and test
batches. Datasets that fit in memory (Fashion-MNIST, MNIST, CIFAR, SVHN, synthetic) are
decoded once into a uint8 tensor on the training device, where whole batches are
augmented (tensors.py); ``image_folder`` (image_folder.py) and ``custom`` (custom.py)
take that way from memory or from a decoded file on disk (image_cache.py), or with
``data.cache=none`` the per-image DataLoader path (loaders.py)."""

from __future__ import annotations

import torch

from stable_cnn.config import CustomDataConfig, DataConfig, ImageFolderConfig
from stable_cnn.data.augment import BatchMixing, TestTimeAugmentation
from stable_cnn.data.custom import custom_splits
from stable_cnn.data.image_folder import image_folder_splits
from stable_cnn.data.splits import ONE_PROCESS, DataSplits, Shard
from stable_cnn.data.tensors import tensor_splits


def build_splits(
    config: DataConfig,
    device: torch.device,
    seed: int,
    shard: Shard = ONE_PROCESS,
    train_device: torch.device | None = None,
    test_only: bool = False,
) -> DataSplits:
    """Load the dataset named by ``config.name`` and cut it into train, val and test batches.
    ``seed`` is the run's seed: the data's random streams derive their own from it.
    ``shard`` is this process's share of each pass when several processes train.
    ``train_device`` is where the training images are kept (default: ``device``): a
    command that only evaluates keeps them off the GPU; ``test_only``: it needs only the
    test split (data=custom then decodes no other image)."""
    if isinstance(config, ImageFolderConfig):
        return image_folder_splits(config, seed, device, shard, train_device, test_only)
    if isinstance(config, CustomDataConfig):
        return custom_splits(config, seed, device, shard, train_device, test_only)
    return tensor_splits(config, device, seed, shard, train_device)


def batch_mixing(config: DataConfig, num_classes: int) -> BatchMixing | None:
    """The training batches' mixup or cutmix, or None (off, or data.augment=false)."""
    if not config.augment or (config.mixup_alpha == 0 and config.cutmix_alpha == 0):
        return None
    return BatchMixing(num_classes, config.mixup_alpha, config.cutmix_alpha, config.mix_prob)


def test_time_augmentation(config: DataConfig) -> TestTimeAugmentation:
    """How validation and test images are seen: as they are, flipped, shifted."""
    return TestTimeAugmentation(config.tta_flip, config.tta_translate)
