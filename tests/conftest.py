"""Shared test helpers: compose the real config, run the real CLI, find real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Under pytest-xdist (`pytest -n 2`) the test processes share the cores: each of them,
# and every command it starts, computes on one thread, so that two processes on two
# cores do not fight over them (two threads each ran the suite slower than one process).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch  # after the thread setting above: torch reads it when imported
from hydra import compose, initialize_config_dir

from stable_cnn.cli.conf import config_dir
from stable_cnn.cli.train import parse_run_config
from stable_cnn.config import RunConfig
from stable_cnn.data.datasets import install_idx_files
from stable_cnn.training.host_syncs import counting_host_waits

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# The smallest settings that still exercise the real paths (width 8, a few steps).
TINY = [
    "data=synthetic",
    "model.width=8",
    "trainer.epochs=2",
    "trainer.device=cpu",
    "trainer.log_every_n_steps=2",
    "diagnostics.figures_every_n_epochs=null",  # figures have tests of their own
]


@pytest.fixture
def host_reads() -> Counter:
    """Counts every read of a tensor value by the host, by method (training/host_syncs.py)."""
    with counting_host_waits() as counts:
        yield counts


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def compose_run(overrides: list[str]) -> RunConfig:
    return parse_run_config(compose_config(overrides))


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, module: bool = True
) -> subprocess.CompletedProcess:
    """Run the trainer as a user would; returns the finished process (text output)."""
    if module:
        command = [sys.executable, "-m", "stable_cnn.train", *args]
    else:
        command = [str(Path(sys.executable).parent / "stable-cnn-train"), *args]
    full_env = {k: v for k, v in os.environ.items() if k != "STABLE_CNN_DATA"}
    full_env.update(env or {})
    return subprocess.run(
        command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the real Fashion-MNIST, decompressed from the Debian package."""
    if not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("data")
    install_idx_files(FASHION_MNIST_SYSTEM_DIR, root / "FashionMNIST" / "raw")
    return root


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """This machine with one H100, faked at torch.cuda's API boundary (tests/fake_gpu.py
    says what and why); set ``.count``, ``.capability``, ``.name`` before use. Also puts
    back the global CUDA flags that a run sets (TF32, cuDNN autotuning)."""
    from tests.fake_gpu import FakeGPU

    flags = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    yield FakeGPU().install(monkeypatch.setattr)
    (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    ) = flags
