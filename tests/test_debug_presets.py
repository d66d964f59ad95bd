"""The debug presets (conf/debug/): a one-batch check, an overfitting check and a
profiler trace, each a quick run of the real CLI on real Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, run_cli

pytestmark = pytest.mark.slow


def debug_run(tmp_path: Path) -> Path:
    """The one run folder a debug preset left under outputs/debug/."""
    runs = list((tmp_path / "outputs" / "debug").glob("*/*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_fast_dev_run_trains_validates_and_tests_one_batch_and_keeps_no_checkpoint(
    fashion_mnist_root: Path, tmp_path: Path
):
    done = run_cli(["debug=fast_dev_run", f"data.root={fashion_mnist_root}"], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "data fashion_mnist: 128 train / 128 val / 128 test images, batch 128" in done.stdout
    run_dir = debug_run(tmp_path)
    assert [e["epoch"] for e in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 1
    assert not (run_dir / "checkpoints").exists()
    assert "checkpoints deleted (trainer.keep_checkpoints=false)" in done.stdout


def test_overfit_reaches_a_near_zero_loss_on_one_batch_and_says_so(
    fashion_mnist_root: Path, tmp_path: Path
):
    done = run_cli(["debug=overfit", f"data.root={fashion_mnist_root}"], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "the model fits these images; stopping" in done.stdout
    epochs = read_jsonl(debug_run(tmp_path) / "metrics.jsonl")
    assert epochs[-1]["train_loss"] < 0.05 and len(epochs) < 100
    assert all(e["global_step"] == e["epoch"] for e in epochs), "one batch an epoch"


def test_overfit_says_when_the_model_did_not_fit(fashion_mnist_root: Path, tmp_path: Path):
    done = run_cli(
        [
            "debug=overfit",
            f"data.root={fashion_mnist_root}",
            "optimizer.lr=1e-7",
            "trainer.epochs=2",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "not below 0.05 (trainer.stop_at_train_loss): the model did not fit" in done.stdout


def test_profile_writes_a_chrome_trace_of_the_training_steps(
    fashion_mnist_root: Path, tmp_path: Path
):
    done = run_cli(["debug=profile", f"data.root={fashion_mnist_root}"], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    traces = list((debug_run(tmp_path) / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, "one trace, of rank 0"
    events = json.loads(traces[0].read_text())["traceEvents"]  # what Perfetto reads
    names = [event.get("name", "") for event in events]
    assert names.count("train_step") == 5, "the 5 traced steps, each named"
    assert any(name.startswith("aten::convolution_backward") for name in names)
    assert "profile of the traced steps, by self_cpu_time_total" in done.stdout
    assert "profiler trace:" in done.stdout and "ui.perfetto.dev" in done.stdout


@pytest.mark.parametrize(
    "arguments, said",
    [
        (
            ["-m", "debug=fast_dev_run", "optimizer.lr=0.1,0.2"],
            "debug=fast_dev_run is one quick run, not a sweep: drop -m (or debug=fast_dev_run)",
        ),
        (
            ["debug=overfit", "trainer.resume=auto"],
            "debug=overfit starts a fresh run and keeps no checkpoint: drop trainer.resume "
            "(or debug=overfit)",
        ),
    ],
)
def test_a_debug_preset_that_makes_no_sense_is_one_line(arguments, said, tmp_path: Path):
    done = run_cli(arguments, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"stable-cnn-train: error: {said}"]
    assert not (tmp_path / "outputs").exists()
