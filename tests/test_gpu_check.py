"""scripts/gpu_check.sh in its dry mode: every step but the CUDA parts, on the CPU, so
that the one command a GPU session runs is known to work before a GPU is lent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import FASHION_MNIST_SYSTEM_DIR, REPO

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_writes_its_summary(tmp_path: Path):
    if not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    out = tmp_path / "gpu-check"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    steps = [
        "facts",
        "default_command",
        "cuda_tests",
        "host_syncs",
        "torchrun_sync_batchnorm",
        "fp16",
        "benchmark_b32",
        "image_folder",
        "resnet18",
        "time_to_accuracy",
    ]
    listed = [
        line.split("|")[1].strip()
        for line in summary.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip() in steps
    ]
    assert listed == steps, "every step ran, in this order: " + summary
    for step in steps:
        assert f"| {step} | ok |" in summary, summary
    assert "(one of 1 processes, gloo)" in summary, "torchrun ran the distributed path"
    assert "precision fp16 (amp=fp16 (slow off CUDA))" in summary
    assert "| eager | bf16 | 0.00 | n/a (CPU) |" in summary, "host reads per step: none"
    assert "| stable-cnn loop | bf16 |" in summary and "| ceiling | fp16 |" in summary
    assert "| data=image_folder data.cache=disk |" in summary, "the folder's table"
    assert "| plain ImageFolder + DataLoader loop (training only) |" in summary
    assert "test accuracy" in summary and "SKIPPED" in summary  # cuda tests skip on a CPU
    files = sorted(path.name for path in out.iterdir())
    assert files == ["logs.tar.gz", "summary.md", "time_to_accuracy.json"], files
    assert len(files) <= 8, "the device tool brings back at most 8 files"
