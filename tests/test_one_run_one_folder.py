"""One run, one folder: a working folder after a day of use holds a folder per training
run and nothing else, and the report and TensorBoard count them as a user would."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_cnn.errors import EXIT_PREEMPTED
from tests.conftest import TINY, run_cli
from tests.test_export import command
from tests.test_resume import RESUMABLE

pytestmark = pytest.mark.slow

STOPPED = [*RESUMABLE, "trainer.epochs=2"]  # stopped in epoch 2, resumed for the rest of it


def run_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "outputs").glob("*/*") if p.is_dir())


def wait_for_a_first_epoch(root: Path, process: subprocess.Popen, known: list[Path]) -> Path:
    """The folder of the run ``process`` is training (none of ``known``), once its first
    epoch is logged."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for metrics in (root / "outputs").glob("*/*/metrics.jsonl"):
            if metrics.parent not in known and metrics.read_text().strip():
                return metrics.parent
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("the run did not get far enough")


def test_a_days_work_leaves_one_folder_per_run(tmp_path: Path):
    """A finished run (started with trainer.resume=auto, nothing to resume yet), a refused
    one, one stopped with Ctrl-C and continued with trainer.resume=auto, then eval, export
    and predict: two run folders, both finished."""
    finished = run_cli([*TINY, "trainer.epochs=1", "trainer.resume=auto"], tmp_path)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "trainer.resume=auto: no unfinished run of this config" in finished.stdout
    assert "starting a new run" in finished.stdout
    (first,) = run_folders(tmp_path)
    date, time_of_day = first.parent.name, first.name  # Hydra's outputs/<date>/<time>
    assert first.parent.parent == tmp_path / "outputs"
    assert len(date) == 10 and date.count("-") == 2 and time_of_day.count("-") == 2

    refused = run_cli([*TINY, "optimizer.lr=-1"], tmp_path)
    assert refused.returncode == 2 and run_folders(tmp_path) == [first]

    time.sleep(1.1)  # Hydra names run folders by the second
    process = subprocess.Popen(
        [sys.executable, "-m", "stable_cnn.train", *STOPPED],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    second = wait_for_a_first_epoch(tmp_path, process, known=[first])
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == EXIT_PREEMPTED
    time.sleep(1.1)
    resumed = run_cli([*STOPPED, "trainer.resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {second / 'checkpoints' / 'last.pt'}" in resumed.stdout
    assert run_folders(tmp_path) == [first, second], "the resumed run went on in its folder"
    log = (second / "train.log").read_text()
    assert "SIGINT" in log and "resuming from" in log and "test of best checkpoint" in log
    assert len(list(second.glob("events.out.tfevents.*"))) == 2, "one TensorBoard run"

    assert command("stable-cnn-eval", f"checkpoint={first}", cwd=tmp_path).returncode == 0
    export = command("stable-cnn-export", f"checkpoint={first}", "format=onnx", cwd=tmp_path)
    assert export.returncode == 0, export.stdout + export.stderr
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(images / f"{k}.png")
    labels = {}
    for model in (first, first / "export" / "best.onnx"):
        out = tmp_path / f"{Path(model).name}.csv"
        done = command(
            "stable-cnn-predict",
            f"checkpoint={model}",
            f"input={images}",
            f"out={out}",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        labels[model] = [line.split(",")[1] for line in out.read_text().splitlines()[1:]]
    assert labels[first / "export" / "best.onnx"] == labels[first], "the checkpoint's classes"

    assert run_folders(tmp_path) == [first, second]
    report = command("stable-cnn-report", "outputs", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "2 runs in 2 configurations" in report.stdout
    rows = [line for line in report.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and all(row.endswith("| finished |") for row in rows), report.stdout
