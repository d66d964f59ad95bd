"""data.cache=disk trains from a cache file several times larger than the memory the run
may take, and resumes bit for bit.

Each run is stable-cnn-train in a memory cgroup of its own whose limit is under a third of
the cache file's size. The interpreter, torch and stable-cnn are imported first and the
process joins the cgroup only then (what a process charged before it joined stays
outside), so that the limit measures what the run itself takes: its model, its batches,
and the page cache its reads of the file fill. The file's pages are dropped from the page
cache before each run, so that every image is read from the disk under the limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stable_cnn.errors import EXIT_PREEMPTED
from tests.conftest import REPO, read_jsonl
from tests.test_resume import assert_same_run, write_fashion_folder

pytestmark = pytest.mark.slow

# The run itself takes about 56 MB of its own (model, batches, Python): the rest of the
# limit is page cache, dropped and refilled as batches are read.
LIMIT = 96 * 2**20
PER_CLASS = 2500  # training images of each class: 25,000 at 64x64x3 make a 307 MB cache
ARGS = [
    "data=image_folder",
    "data.cache=disk",
    "data.in_channels=3",
    "data.image_size=64",  # the 28-pixel images are resized as they are decoded
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "data.limit_test=200",
    "model.width=4",
    "trainer.epochs=1",  # stopped mid-epoch: one epoch shows the resume
    "trainer.deterministic=true",
    "trainer.progress_bar=false",
    "diagnostics.figures_every_n_epochs=null",
]
# stable-cnn-train, with what it imports loaded before the process joins the cgroup
UNDER_LIMIT = """
import os, sys
import torch, torch.utils.tensorboard, torchvision.models, torchvision.io
import stable_cnn.cli.train as command
import stable_cnn.training.fit, stable_cnn.training.lr_finder, stable_cnn.data.build
import stable_cnn.training.tracking, stable_cnn.training.diagnostics, stable_cnn.system.distributed
with open(sys.argv[1], "w") as procs:
    procs.write(str(os.getpid()))
sys.argv = ["stable-cnn-train", *sys.argv[2:]]
command.cli()
"""


def memory_controller() -> tuple[Path, str] | None:
    """This process's memory cgroup folder and its limit file, where we may make groups
    below it (root in a container, cgroup v1 or v2); else None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            folder, limit = (
                Path("/sys/fs/cgroup/memory") / path.lstrip("/"),
                "memory.limit_in_bytes",
            )
            break
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():  # v2
            folder, limit = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
            break
    else:
        return None
    return (folder, limit) if os.access(folder, os.W_OK) else None


@contextmanager
def memory_limited(name: str) -> Iterator[Path]:
    """A new memory cgroup limited to LIMIT; yields its cgroup.procs, removed afterwards."""
    folder, limit = memory_controller()
    group = folder / f"stable_cnn_test_{os.getpid()}_{name}"
    group.mkdir()
    try:
        (group / limit).write_text(str(LIMIT))
        yield group / "cgroup.procs"
    finally:
        group.rmdir()


def drop_from_page_cache(path: Path) -> None:
    file = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(file, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(file)


@pytest.fixture(scope="module")
def big_folder(fashion_mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST images as PNG files, PER_CLASS of each class to train on and 20
    to validate on, with their data.cache=disk file built (outside any limit)."""
    if memory_controller() is None:
        pytest.skip("needs a memory cgroup this process may make groups in (root, cgroups)")
    root = write_fashion_folder(tmp_path_factory.mktemp("big"), fashion_mnist_root, PER_CLASS, 20)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "stable_cnn.train",
            *ARGS,
            f"data.root={root}",
            "data.limit_train=64",
            "trainer.epochs=1",
            f"hydra.run.dir={root.parent / 'build'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return root


def start_limited(root: Path, run_dir: Path, procs: Path, *extra: str) -> subprocess.Popen:
    (cache,) = (root / ".stable_cnn_cache").glob("train-3x64x64-*[0-9a-f].npy")
    drop_from_page_cache(cache)
    command = [
        sys.executable,
        "-c",
        UNDER_LIMIT,
        str(procs),
        *ARGS,
        f"data.root={root}",
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_logged_steps(run_dir: Path, process: subprocess.Popen) -> None:
    """Until the run's TensorBoard file holds its first flushed step scalars (the writer
    flushes every 10 events: a few log intervals into the epoch)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if sum(path.stat().st_size for path in run_dir.glob("events.out.tfevents.*")) > 400:
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("the run logged no step")


def test_a_cache_three_times_the_memory_limit_trains_and_resumes_bit_for_bit(
    big_folder: Path, tmp_path: Path
):
    (cache,) = (big_folder / ".stable_cnn_cache").glob("train-3x64x64-*[0-9a-f].npy")
    assert cache.stat().st_size >= 3 * LIMIT
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    with memory_limited("whole") as procs:
        run = start_limited(big_folder, whole, procs)
        output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output  # 137: the cgroup's limit killed it
    assert [entry["epoch"] for entry in read_jsonl(whole / "metrics.jsonl")] == [1]
    with memory_limited("stopped") as procs:
        run = start_limited(big_folder, stopped, procs)
        wait_for_logged_steps(stopped, run)
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=600)[0]
    assert run.returncode == EXIT_PREEMPTED and "stopped in epoch 1 at step" in output, output
    with memory_limited("resumed") as procs:
        run = start_limited(big_folder, stopped, procs, f"trainer.resume={stopped}")
        output = run.communicate(timeout=600)[0]
    assert run.returncode == 0 and "resuming from" in output, output
    assert_same_run(whole, stopped)
