"""The data group (conf/data/): which dataset, where it is, how it is batched and augmented."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from stable_cnn.config.checks import check, check_bounds

SAMPLING = ("stratified", "first")  # data.sampling's options
SAMPLERS = ("shuffle", "balanced")  # data.sampler's options


@dataclass
class DataConfig:
    name: str = MISSING  # which dataset (the option's file name)
    root: str = MISSING  # folder holding the dataset
    download: bool = True  # fetch through torchvision when missing
    system_dir: str | None = None  # offline copy installed by a system package
    batch_size: int = 128  # training images per optimizer step
    eval_batch_size: int = 1024  # images per forward pass when evaluating
    val_size: int = 5000  # training images held out for validation; 0 = validate on test
    limit_train: int | None = None  # use only N training images (as data.sampling draws them)
    limit_test: int | None = None  # use only N validation and N test images
    # how data.limit_* and data.val_size pick images: stratified (a seeded sample, every
    # class in proportion) | first (the first N: what runs before 2026-12-02 did)
    sampling: str = "stratified"
    # the training order of each epoch: shuffle (every image once) | balanced (as many
    # draws as images, every class alike: drawn with replacement, weight 1 / class count)
    sampler: str = "shuffle"
    # DataLoader worker processes (image_folder only); null: one per CPU core this process
    # may use, less one for the trainer, between 2 and 16
    num_workers: int | None = None
    augment: bool = True  # random crop with padding (+ flip) on training batches
    crop_padding: int = 2  # zero padding per side before the random crop, pixels
    flip: bool = True  # random horizontal flips (off for digits)
    erase_prob: float = 0.0  # random erasing (cutout): chance per training image; 0 = off
    erase_scale: list[float] = field(default_factory=lambda: [0.02, 0.33])  # area fraction
    erase_ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])  # box aspect ratio
    mixup_alpha: float = 0.0  # mixup: blend each image with another, Beta(a, a) share; 0 = off
    cutmix_alpha: float = 0.0  # cutmix: paste a box of another image, Beta(a, a) area; 0 = off
    mix_prob: float = 1.0  # the fraction of training batches mixed (mixup or cutmix)
    tta_flip: bool = False  # evaluate on each image and its mirror image (mean of logits)
    tta_translate: int = 0  # pixels: also evaluate copies shifted by +-N (half the weight)
    in_channels: int = 1
    num_classes: int | None = 10  # null = infer (image_folder)
    image_size: int = 28  # height = width, pixels
    mean: list[float] = field(default_factory=lambda: [0.5])  # per channel, for normalisation
    std: list[float] = field(default_factory=lambda: [0.5])

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        check(
            self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, "must be >= 1"
        )
        if self.val_size is not None:  # data=custom's null: a tenth of the training images
            check(self.val_size >= 0, "data.val_size", self.val_size, "must be >= 0 (0 = use test)")
        check(
            self.sampling in SAMPLING,
            "data.sampling",
            self.sampling,
            f"must be one of {', '.join(SAMPLING)}",
        )
        check(
            self.sampler in SAMPLERS,
            "data.sampler",
            self.sampler,
            f"must be one of {', '.join(SAMPLERS)}",
        )
        for key in ("limit_train", "limit_test"):
            value = getattr(self, key)
            check(value is None or value >= 1, f"data.{key}", value, "must be null or >= 1")
        check(
            self.num_workers is None or self.num_workers >= 0,
            "data.num_workers",
            self.num_workers,
            "must be null (sized from the CPU cores) or >= 0",
        )
        check(self.crop_padding >= 0, "data.crop_padding", self.crop_padding, "must be >= 0")
        check(0 <= self.erase_prob <= 1, "data.erase_prob", self.erase_prob, "must be in [0, 1]")
        for key in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, key)
            check(value >= 0, f"data.{key}", value, "must be >= 0 (0 = off; try 0.2 or 1.0)")
        check(0 <= self.mix_prob <= 1, "data.mix_prob", self.mix_prob, "must be in [0, 1]")
        check(
            self.tta_translate >= 0,
            "data.tta_translate",
            self.tta_translate,
            "must be >= 0 (pixels; 0 = off)",
        )
        check_bounds("data.erase_scale", self.erase_scale, upper=1.0, example="[0.02, 0.33]")
        check_bounds("data.erase_ratio", self.erase_ratio, upper=None, example="[0.3, 3.3]")
        self.check_shape()

    def check_shape(self) -> None:
        """The images' channels, size, classes and normalisation (data=custom: those given)."""
        if self.in_channels is not None:
            check(
                self.in_channels in (1, 3), "data.in_channels", self.in_channels, "must be 1 or 3"
            )
        if self.image_size is not None:
            check(self.image_size >= 8, "data.image_size", self.image_size, "must be >= 8")
        check(
            self.num_classes is None or self.num_classes >= 2,
            "data.num_classes",
            self.num_classes,
            "must be >= 2",
        )
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is None or self.in_channels is None:
                continue
            check(
                len(values) == self.in_channels,
                f"data.{key}",
                list(values),
                f"needs one value per input channel ({self.in_channels})",
            )
        if self.std is not None:
            check(all(s > 0 for s in self.std), "data.std", list(self.std), "must be > 0")


@dataclass
class SyntheticDataConfig(DataConfig):
    """data=synthetic: images made in memory, for tests and smoke runs."""

    num_train: int = 640  # training images generated (val_size of them are held out)
    num_test: int = 256  # test images generated

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_train >= 1, "data.num_train", self.num_train, "must be >= 1")
        check(self.num_test >= 1, "data.num_test", self.num_test, "must be >= 1")


CACHES = ("auto", "memory", "disk", "none")  # data.cache's options


@dataclass
class CachedDataConfig(DataConfig):
    """Images that are decoded once into uint8 at the training size and channels (data=
    image_folder, data=custom): then trained from memory as Fashion-MNIST is
    (data.cache=memory) or from a file (disk), or read image by image every epoch (none)."""

    cache: str = "auto"  # auto: memory where the decoded images fit, else disk, else none
    # data.cache=disk's folder; null: <root>/.stable_cnn_cache for an image folder, the
    # user's cache folder (~/.cache/stable-cnn) for data=custom
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.cache in CACHES, "data.cache", self.cache, f"must be one of {', '.join(CACHES)}")


@dataclass
class ImageFolderConfig(CachedDataConfig):
    """data=image_folder: images in class folders (docs/data.md#your-own-images), cached
    as data.cache says; mean and std left null are computed from the training images."""

    mean: list[float] | None = None  # null: computed from the training images
    std: list[float] | None = None


@dataclass
class CustomDataConfig(CachedDataConfig):
    """data=custom: datasets of your own, from a callable (docs/data.md#your-own-dataset).
    What is left null is found from the data: channels from a sample of training images
    (colour if any is), the size from the first, classes from the datasets' ``classes``
    (else their labels), mean and std from the training images."""

    name: str = "custom"
    # given to the callable where it names them (root=, download=) and they are set;
    # any other argument is +data.KEY=VALUE
    root: str = ""
    download: bool | None = None
    # PACKAGE.MODULE.CALLABLE, called with the +data.KEY=VALUE keys; returns the train and
    # the test dataset, each of (image, label) pairs
    _target_: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)  # filled from +data.KEY=VALUE
    val_size: int | None = None  # null: a tenth of the training images
    in_channels: int | None = None  # null: 3 if any of 16 sampled training images is colour, else 1
    num_classes: int | None = None  # null: the datasets' classes, else the largest label + 1
    image_size: int | None = None  # null: the first training image's (images are resized to it)
    mean: list[float] | None = None  # null: computed from the training images
    std: list[float] | None = None

    def __post_init__(self) -> None:
        check(
            "." in self._target_,
            "data._target_",
            self._target_,
            "must be PACKAGE.MODULE.CALLABLE, importable where the run starts",
        )
        super().__post_init__()
