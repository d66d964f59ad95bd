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
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    for step in ("facts", "cuda_tests", "benchmark_b32", "benchmark_b64", "time_to_accuracy",
                 "torchrun_one_process"):  # fmt: skip
        assert f"| {step} | ok |" in summary, summary
    assert "(one of 1 processes, gloo)" in summary, "torchrun ran the distributed path"
    assert "| stable-cnn loop | bf16 |" in summary and "| ceiling | fp16 |" in summary
    assert "test accuracy" in summary and "skipped" in summary  # cuda tests skip on a CPU
    assert len(list(out.iterdir())) <= 8, "the device tool brings back at most 8 files"
