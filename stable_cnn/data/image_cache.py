"""``data.cache=disk``: an image folder's images decoded once into a uint8 file, reused by
every later run, sweep job, process and evaluation on the machine.

Each of the folder's splits (train/, val/, test/) becomes one ``.npy`` array (N, C, H, W)
at the run's channels and size, in ``<data.root>/.stable_cnn_cache/`` or
``data.cache_dir``, with a ``.json`` beside it holding the key it was built for: the
split's file list with each file's size and modification time, the channels, the size
and this format's version. The array is written under a temporary name and renamed,
then the key is written the same way: a build that was killed leaves no key that
matches, so its remains are never read, and a folder whose files changed gets its cache
rebuilt (one log line says why). Processes of a distributed run build it once: the
first process of each machine opens its data first (training/build.py); processes
that do not know of each other (a sweep's jobs side by side) take turns through a lock
on the cache folder, so one builds and the others read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from stable_cnn.config import ImageFolderConfig
from stable_cnn.errors import DataError

log = logging.getLogger("stable_cnn")

CACHE_FOLDER = ".stable_cnn_cache"
VERSION = 2  # of the file's layout (its rows' order) and the decoding that fills it
CHUNK_IMAGES = 4096  # decoded, then written, at once


def file_order(count: int) -> torch.Tensor:
    """Which of the folder's images (ImageFolder sorts them by class) each row of its
    cache holds: a fixed shuffle, so that a block of consecutive rows, which a run reads
    together, holds every class in proportion."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(VERSION))


def rows_of(images: torch.Tensor, count: int) -> torch.Tensor:
    """The cache rows of the folder's images ``images`` (indices into its samples)."""
    return file_order(count).argsort()[images]


def cache_folder(config: ImageFolderConfig) -> Path:
    if config.cache_dir is not None:
        return Path(config.cache_dir).expanduser()
    return Path(config.root).expanduser() / CACHE_FOLDER


def folder_key(folder: Any, channels: int, size: int) -> str:
    """What the cache of ``folder`` (a torchvision ImageFolder) depends on, hashed."""
    digest = hashlib.sha256(f"v{VERSION} channels {channels} size {size}\n".encode())
    for path, label in folder.samples:
        stat = os.stat(path)
        name = os.path.relpath(path, folder.root)
        digest.update(f"{name}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_folder(folder: Any, split: str, config: ImageFolderConfig, decode: Any) -> np.memmap:
    """Every image of ``folder`` as a uint8 array (N, C, H, W) mapped from the cache file
    (pages are read as they are used), built first with ``decode(subset)`` where no
    cache matches."""
    channels, size = config.in_channels, config.image_size
    directory = cache_folder(config)
    root = hashlib.sha256(str(Path(folder.root).resolve()).encode()).hexdigest()[:8]
    stem = directory / f"{split}-{channels}x{size}x{size}-{root}"  # several roots, one cache_dir
    array_path, key_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    key = folder_key(folder, channels, size)
    if built_for(key_path, array_path) == key:
        log.info("data.cache=disk: reading %s", array_path)
        return open_array(array_path)
    directory.mkdir(parents=True, exist_ok=True)
    with building(directory):  # sweep jobs side by side: one builds, the others wait
        if built_for(key_path, array_path) == key:  # by another process meanwhile
            log.info("data.cache=disk: reading %s", array_path)
            return open_array(array_path)
        return build(folder, split, config, decode, key, stem)


def built_for(key_path: Path, array_path: Path) -> str | None:
    """The key the cache was built for, or None where none was finished."""
    if not (key_path.exists() and array_path.exists()):
        return None
    return json.loads(key_path.read_text()).get("key")


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
    folder: Any, split: str, config: ImageFolderConfig, decode: Any, key: str, stem: Path
) -> np.memmap:
    """Decode ``folder`` into the cache file at ``stem``, then write its key."""
    channels, size = config.in_channels, config.image_size
    array_path, key_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if key_path.exists():
        log.info(
            "data.cache=disk: %s/ changed since %s was built: rebuilding it", split, array_path
        )
    for remains in stem.parent.glob(f"{stem.name}.*.tmp*"):  # of a build that was killed
        remains.unlink()
    started = time.perf_counter()
    count = len(folder.samples)
    temporary = stem.with_name(f"{stem.name}.{os.getpid()}.tmp.npy")
    array = np.lib.format.open_memmap(
        temporary, mode="w+", dtype=np.uint8, shape=(count, channels, size, size)
    )
    order = file_order(count).tolist()
    for start in range(0, count, CHUNK_IMAGES):
        chunk = Subset(folder, order[start : start + CHUNK_IMAGES])
        array[start : start + len(chunk)] = decode(chunk)[0].numpy()
    array.flush()
    del array
    replace_durably(temporary, array_path)
    written = key_path.with_name(f"{key_path.name}.{os.getpid()}.tmp")
    written.write_text(json.dumps({"key": key, "images": count, "folder": str(folder.root)}))
    replace_durably(written, key_path)  # last: only now does the cache count
    log.info(
        "data.cache=disk: %d images of %s/ decoded into %s (%.0f MiB) in %.1f s",
        count,
        split,
        array_path,
        array_path.stat().st_size / 2**20,
        time.perf_counter() - started,
    )
    return open_array(array_path)


def open_array(path: Path) -> np.memmap:
    """The cached array, memory-mapped (copy on write: torch wants a writable array; the
    file is never written through it)."""
    return np.load(path, mmap_mode="c")


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
        if torch.device(device).type != "cpu":  # the batches go to the device one by one
            raise ValueError("data.cache=disk keeps its training images on the CPU")
        return self

    def __del__(self) -> None:
        os.close(self.file)
