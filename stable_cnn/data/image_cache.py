"""``data.cache``: where a run's images live once decoded (memory, a file, or nowhere),
and the file of ``data.cache=disk``, reused by every later run, sweep job, process and
evaluation on the machine.

Each split of the source (an image folder's train/, val/, test/; a data=custom
callable's train and test datasets) becomes one ``.npy`` array (N, C, H, W) of uint8 at
the run's channels and size, a ``.rows.npy`` with each row's source image and label,
and a ``.json`` holding the key it was built for: for a folder, its file list with each
file's size and modification time; for a callable, its name and arguments, its
datasets' lengths, a sample of their images, their ``targets`` and the files they list
(as torchvision's folders do); and the channels, the size and this format's version.
The arrays are written under temporary names and renamed, then the key is written the
same way (an old key is removed first): a build that was killed leaves no key that
matches, so its remains are never read, and a source that changed gets its cache
rebuilt (one log line says so). Processes of a distributed run build it once: the
first process of each machine opens its data first (training/build.py); processes that
do not know of each other (a sweep's jobs side by side) take turns through a lock on the
cache folder, so one builds and the others read.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stable_cnn.config import CustomDataConfig, DataConfig, ImageFolderConfig
from stable_cnn.data.decode import image_tensor
from stable_cnn.errors import DataError
from stable_cnn.system.memory import available_memory, device_memory_available

log = logging.getLogger("stable_cnn")

CACHE_FOLDER = ".stable_cnn_cache"
VERSION = 3  # of the files' layout (their rows' order, the labels) and the decoding
CHUNK_IMAGES = 4096  # decoded, then written, at once
MEMORY_SHARE = 4  # in memory when the uint8 images take at most 1/4 of the memory available
DEVICE_SHARE = 2  # and, on a GPU, at most half its free memory (training needs the rest)
Part = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, C, H, W), or FileRows, and labels


def fits_in_memory(config: DataConfig, images: int, device: torch.device, copies: int = 1) -> bool:
    """Whether ``images`` decoded images (``copies`` of them: one per process on this
    machine) fit in a quarter of the memory this job may still take (its cgroup's limit
    counted) and, where they would live on a GPU, in half its free memory."""
    needed = images * config.in_channels * config.image_size**2
    host = available_memory()
    fits_host = needed * copies <= 2**31 if host is None else needed * copies * MEMORY_SHARE <= host
    on_device = device_memory_available(device)
    return fits_host and (on_device is None or needed * DEVICE_SHARE <= on_device)


def chosen_cache(
    config: ImageFolderConfig | CustomDataConfig, images: int, device: torch.device, copies: int = 1
) -> str:
    """data.cache as given, or for ``auto``: memory where ``images`` decoded images
    (``copies`` of them) fit (fits_in_memory), else disk where its cache folder can be
    written, else none; logged with why."""
    if config.cache != "auto":
        return config.cache
    mib = images * config.in_channels * config.image_size**2 / 2**20
    size = f"{images} images take {mib:.0f} MiB as uint8"
    if fits_in_memory(config, images, device, copies):
        log.info("data.cache=auto: memory (%s)", size)
        return "memory"
    folder = cache_folder(config)
    if writable(folder):
        log.info("data.cache=auto: disk (%s, more than fits in memory): %s", size, folder)
        return "disk"
    log.info(
        "data.cache=auto: none, images read one by one (%s, more than fits in memory, and "
        "%s cannot be written: set data.cache_dir)",
        size,
        folder,
    )
    return "none"


def writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and can be written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def cache_folder(config: ImageFolderConfig | CustomDataConfig) -> Path:
    """data.cache_dir, or by default: beside an image folder, in <root>/.stable_cnn_cache;
    for data=custom, in the user's cache folder ($XDG_CACHE_HOME, else ~/.cache)."""
    if config.cache_dir is not None:
        return Path(config.cache_dir).expanduser()
    if isinstance(config, ImageFolderConfig):
        return Path(config.root).expanduser() / CACHE_FOLDER
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "stable-cnn"


def file_order(count: int) -> torch.Tensor:
    """Which of the source's images (ImageFolder sorts them by class; datasets often do)
    each row of its cache holds: a fixed shuffle, so that a block of consecutive rows,
    which a run reads together, holds every class in proportion."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(VERSION))


@dataclass(frozen=True)
class CachedImages:
    """A split's images as its cache file holds them, mapped from the file (pages are
    read as they are used), and row by row the source's image each row holds (its index
    among the source's items) and its label."""

    images: np.memmap  # (N, C, H, W) uint8
    sources: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N,) int64

    def part(self, index: torch.Tensor, block_rows: int | None = None) -> tuple[Part, torch.Tensor]:
        """The source's images ``index`` and their labels, in the file's order: read now
        into memory, or with ``block_rows`` (training) read a batch at a time (FileRows);
        and which of the source's images they are, in that order."""
        rows = self.sources.argsort()[index].sort().values  # file order: reads stay close
        if block_rows is not None:  # the file may be larger than memory
            return (FileRows(self.images, rows, block_rows), self.labels[rows]), self.sources[rows]
        return (torch.from_numpy(self.images[rows.numpy()]), self.labels[rows]), self.sources[rows]


def folder_key(folder: Any, channels: int, size: int) -> str:
    """What the cache of ``folder`` (a torchvision ImageFolder) depends on, hashed."""
    digest = hashlib.sha256(f"v{VERSION} channels {channels} size {size}\n".encode())
    for path, label in folder.samples:
        stat = os.stat(path)
        name = os.path.relpath(path, folder.root)
        digest.update(f"{name}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_folder(
    folder: Any, split: str, config: ImageFolderConfig, decode: Callable[[list[int]], Part]
) -> CachedImages:
    """Every image of ``folder`` (a torchvision ImageFolder) from the cache file, built
    first with ``decode(indices)`` where no cache matches."""
    channels, size = config.in_channels, config.image_size
    root = hashlib.sha256(str(Path(folder.root).resolve()).encode()).hexdigest()[:8]
    stem = (
        cache_folder(config) / f"{split}-{channels}x{size}x{size}-{root}"
    )  # one cache_dir, many roots
    key = folder_key(folder, channels, size)
    return cached_images(stem, key, len(folder.samples), decode, f"{split}/")


def cached_dataset(
    dataset: Any, split: str, config: CustomDataConfig, decode: Callable[[list[int]], Part]
) -> CachedImages:
    """Every image of a data=custom ``dataset`` from the cache file, built first with
    ``decode(indices)`` where no cache matches."""
    channels, size = config.in_channels, config.image_size
    call = json.dumps([config._target_, config.kwargs], sort_keys=True, default=str)
    source = hashlib.sha256(call.encode()).hexdigest()[:8]
    stem = cache_folder(config) / f"custom-{split}-{channels}x{size}x{size}-{source}"
    digest = hashlib.sha256(f"v{VERSION} channels {channels} size {size}\n{call}\n".encode())
    digest.update(f"{split} {len(dataset)}\n".encode())
    for i in torch.linspace(0, len(dataset) - 1, min(SAMPLE, len(dataset))).long().tolist():
        image, label = dataset[i]  # a sample of images, spread evenly, as the run sees them
        digest.update(image_tensor(image, channels, size, f"{split} image {i}").numpy())
        digest.update(f"{label}\n".encode())
    targets = getattr(dataset, "targets", None)  # every label, where the dataset lists them
    if targets is not None:
        digest.update(np.asarray(targets).tobytes())
    for path in listed_files(dataset):  # torchvision's folders list their files
        stat = os.stat(path)
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return cached_images(stem, digest.hexdigest(), len(dataset), decode, f"the {split} dataset")


SAMPLE = 64  # images of a data=custom dataset whose pixels go into its cache's key


def listed_files(dataset: Any) -> list[str]:
    """The image files a dataset lists as ``samples`` of (path, label), as torchvision's
    DatasetFolder does; none where its samples are anything else."""
    listed = getattr(dataset, "samples", None)
    if not isinstance(listed, list) or not listed:
        return []
    paths = [item[0] if isinstance(item, tuple) and item else None for item in listed]
    if not all(isinstance(path, str | os.PathLike) and os.path.isfile(path) for path in paths):
        return []
    return [os.fspath(path) for path in paths]


def cached_images(
    stem: Path, key: str, count: int, decode: Callable[[list[int]], Part], source: str
) -> CachedImages:
    """The ``count`` images of ``source`` from the cache files at ``stem`` where they were
    built for ``key``; else built first with ``decode(indices)``, by one process at a time."""
    paths = cache_paths(stem)
    if built_for(paths) == key:
        log.info("data.cache=disk: reading %s", paths["images"])
        return open_cache(paths)
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        with building(stem.parent):  # sweep jobs side by side: one builds, the others wait
            if built_for(paths) == key:  # by another process meanwhile
                log.info("data.cache=disk: reading %s", paths["images"])
                return open_cache(paths)
            return build(stem, key, count, decode, source)
    except OSError as err:
        if err.errno not in UNWRITABLE:
            raise
        raise DataError(
            f"data.cache=disk: {err.filename or stem.parent} cannot be written ({err.strerror}): "
            f"set data.cache_dir to a folder with room that you can write, or data.cache=memory"
        ) from None


# A cache folder that cannot take the files: not allowed, read-only, full, over quota,
# or a file where a folder should be.
UNWRITABLE = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
}


def cache_paths(stem: Path) -> dict[str, Path]:
    return {
        "images": stem.with_suffix(".npy"),
        "rows": stem.with_suffix(".rows.npy"),  # each row's source image and label
        "key": stem.with_suffix(".json"),
    }


def built_for(paths: dict[str, Path]) -> str | None:
    """The key the cache was built for, or None where none was finished."""
    if not all(path.exists() for path in paths.values()):
        return None
    return json.loads(paths["key"].read_text()).get("key")


@contextmanager
def building(directory: Path) -> Iterator[None]:
    """This process alone builds in ``directory``: a lock on its ``.lock`` file (POSIX
    record locks, which NFS shares between machines too)."""
    handle = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def build(
    stem: Path, key: str, count: int, decode: Callable[[list[int]], Part], source: str
) -> CachedImages:
    """Decode the ``count`` images of ``source`` into the cache files at ``stem``, then
    write its key."""
    paths = cache_paths(stem)
    if paths["key"].exists():
        log.info(
            "data.cache=disk: %s changed since %s was built (or stable-cnn's cache format "
            "did): rebuilding it",
            source,
            paths["images"],
        )
    for remains in stem.parent.glob(f"{stem.name}.*.tmp*"):  # of a build that was killed
        remains.unlink()
    started = time.perf_counter()
    temporary = {  # x.npy: x.<pid>.tmp.npy, and so on
        name: path.with_suffix(f".{os.getpid()}.tmp{path.suffix}") for name, path in paths.items()
    }
    try:
        write_files(temporary, key, count, decode, source)
        paths["key"].unlink(missing_ok=True)  # the old key must never stand beside new arrays
        replace_durably(temporary["images"], paths["images"])
        replace_durably(temporary["rows"], paths["rows"])
        replace_durably(temporary["key"], paths["key"])  # last: only now does the cache count
    finally:  # a failed build (an unreadable image, a full disk) leaves nothing behind
        for path in temporary.values():
            path.unlink(missing_ok=True)
    log.info(
        "data.cache=disk: %d images of %s decoded into %s (%.0f MiB) in %.1f s",
        count,
        source,
        paths["images"],
        paths["images"].stat().st_size / 2**20,
        time.perf_counter() - started,
    )
    return open_cache(paths)


def write_files(
    files: dict[str, Path], key: str, count: int, decode: Callable[[list[int]], Part], source: str
) -> None:
    """The images, decoded in the file's order, each row's source image and label, and
    the key, written to ``files``."""
    array = None
    rows = np.empty((count, 2), dtype=np.int64)  # each row's source image and label
    rows[:, 0] = file_order(count).numpy()
    for start in range(0, count, CHUNK_IMAGES):
        images, rows[start : start + len(images), 1] = decode(
            rows[start : start + CHUNK_IMAGES, 0].tolist()
        )
        if array is None:  # the decoder says the images' shape
            shape = (count, *images.shape[1:])
            array = np.lib.format.open_memmap(files["images"], "w+", np.uint8, shape)
        array[start : start + len(images)] = images.numpy()
    array.flush()
    del array
    np.save(files["rows"], rows)
    files["key"].write_text(json.dumps({"key": key, "images": count, "source": source}))


def open_cache(paths: dict[str, Path]) -> CachedImages:
    """The cached images, memory-mapped (copy on write: torch wants a writable array; the
    file is never written through it), each row's source image and its label."""
    rows = torch.from_numpy(np.load(paths["rows"]))
    return CachedImages(np.load(paths["images"], mmap_mode="c"), rows[:, 0], rows[:, 1])


def replace_durably(source: Path, target: Path) -> None:
    """``source`` renamed over ``target`` once its bytes are on disk."""
    with open(source, "rb") as file:
        os.fsync(file.fileno())
    os.replace(source, target)


class FileRows:
    """Rows ``rows`` of a cached array standing in for TensorBatches' images (on the CPU):
    a batch is read from the file when it is asked for, row by row in file order (then
    put back in the batch's), with plain reads rather than through the memory map, so
    that the page cache they fill can be dropped at once when memory runs short and a
    dataset larger than memory trains from the disk. ``block_rows``: TensorBatches
    shuffles blocks of this many consecutive rows, and the rows within each block, so
    that a batch's reads stay close together."""

    device = torch.device("cpu")

    def __init__(self, array: np.memmap, rows: torch.Tensor, block_rows: int) -> None:
        self.path, self.offset = array.filename, array.offset  # the .npy file, its header size
        self.rows = rows.sort().values  # in file order: the run shuffles them anyway
        self.block_rows = block_rows
        self.shape = (len(self.rows), *array.shape[1:])
        self.row_bytes = int(np.prod(self.shape[1:]))
        self.file = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        rows = self.rows[index]
        in_file_order, position = rows.sort()
        batch = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8)
        buffers = batch.numpy().reshape(len(rows), -1)
        for buffer, row in zip(buffers, in_file_order.tolist(), strict=True):
            read = os.preadv(self.file, [buffer], self.offset + row * self.row_bytes)
            if read != self.row_bytes:  # the file was cut short under the run
                raise DataError(f"data.cache=disk: {self.path} ends early: delete it")
        return batch[position.argsort()]

    def to(self, device: torch.device) -> FileRows:
        if torch.device(device).type != "cpu":
            raise ValueError("data.cache=disk reads its training images on the host")
        return self

    def close(self) -> None:
        if getattr(self, "file", None) is not None:  # None: closed, or never opened
            os.close(self.file)
            self.file = None

    def __del__(self) -> None:
        self.close()
