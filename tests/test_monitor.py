"""trainer.monitor: best.pt, the k best checkpoints and early stopping on any validation
metric, across a SIGTERM and a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stable_cnn.config import TrainerConfig
from stable_cnn.errors import ConfigError
from stable_cnn.state.run_state import Counters
from stable_cnn.training.evaluation import EvalStats
from stable_cnn.training.monitor import Monitor, tidy_kept
from tests.conftest import TINY, read_jsonl, run_cli
from tests.test_export import command
from tests.test_resume import stop_in_second_epoch

TOP_3_BY_LOSS = [
    *TINY,
    "data.num_train=3000",  # long enough epochs for the signal to land in one
    "trainer.epochs=6",
    "optimizer.lr=1.0",  # a loss that goes up and down: the last epoch is not among the best
    "scheduler=none",
    "trainer.monitor=val_loss",
    "trainer.save_top_k=3",
    "trainer.deterministic=true",
    "trainer.progress_bar=false",
]


@pytest.mark.slow
def test_the_three_lowest_loss_checkpoints_are_kept_across_sigterm_and_resume(tmp_path: Path):
    run_dir = tmp_path / "run"
    stop_in_second_epoch(TOP_3_BY_LOSS, run_dir, cwd=tmp_path)
    done = run_cli([*TOP_3_BY_LOSS, f"hydra.run.dir={run_dir}", "trainer.resume=auto"], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout

    epochs = read_jsonl(run_dir / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5, 6]
    lowest = sorted(epochs, key=lambda e: (e["val_loss"], e["epoch"]))[:3]
    results = json.loads((run_dir / "results.json").read_text())
    names = [f"epoch{e['epoch']:03d}-val_loss{e['val_loss']:.4f}.pt" for e in lowest]
    assert results["kept_checkpoints"] == names, "best first"
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "best.pt", "last.pt"])
    assert results["monitor"] == "val_loss"
    assert results["best_epoch"] == lowest[0]["epoch"]
    assert results["best_val_loss"] == pytest.approx(lowest[0]["val_loss"])
    assert results["best_val_acc"] == pytest.approx(lowest[0]["val_acc"]), "best.pt's accuracy"
    for entry, name in zip(lowest, names, strict=True):
        kept = torch.load(folder / name, weights_only=True)
        assert kept["counters"]["epoch"] == entry["epoch"]
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["counters"]["epoch"] == lowest[0]["epoch"]
    assert f"test of best checkpoint (epoch {lowest[0]['epoch']}, val_loss" in done.stdout

    report = command("stable-cnn-report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert (
        "| best val acc (%) | best val_loss | test acc (%) | test macro-F1 (%) |" in report.stdout
    )
    assert f"| {lowest[0]['val_loss']:.4f} |" in report.stdout
    unsortable = command("stable-cnn-report", str(run_dir), "--metric", "best_val_f1", cwd=tmp_path)
    assert unsortable.returncode == 2
    assert "error: no run here has best_val_f1" in unsortable.stderr


def test_a_resumed_run_puts_its_kept_files_and_best_pt_back_as_its_counters_say(tmp_path: Path):
    """What a kill between best.pt and last.pt, or before the pushed-out file went, left."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, content in [
        ("epoch001-val_loss0.5000.pt", b"epoch 1"),
        ("epoch002-val_loss0.4000.pt", b"epoch 2, killed before last.pt"),
        ("best.pt", b"epoch 2, killed before last.pt"),
        ("last.pt", b"epoch 1"),
        ("epoch1-notes.pt", b"a file of the user's"),
    ]:
        (folder / name).write_bytes(content)
    counters = Counters(epoch=1, best_epoch=1, best_value=0.5)
    counters.kept = [{"epoch": 1, "value": 0.5, "file": "epoch001-val_loss0.5000.pt"}]
    tidy_kept(folder, counters)
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt",
        "epoch001-val_loss0.5000.pt",
        "epoch1-notes.pt",
        "last.pt",
    ]
    assert (folder / "best.pt").read_bytes() == b"epoch 1"


def stats(loss: float, accuracy: float = 50.0) -> EvalStats:
    return EvalStats(loss, accuracy, images=100, confusion=torch.eye(10, dtype=torch.int64))


def test_early_stopping_counts_from_the_last_improvement_bigger_than_min_delta():
    trainer = TrainerConfig(
        monitor="val_loss", early_stopping_patience=2, early_stopping_min_delta=0.05
    )
    monitor, counters = Monitor.of(trainer, num_classes=10), Counters()
    losses = [1.0, 0.9, 0.88, 0.87, 0.5]  # epochs 3 and 4: better, but not by 0.05
    verdicts = [
        monitor.judge(counters, epoch, stats(loss), train_loss=1.0)
        for epoch, loss in enumerate(losses, 1)
    ]
    assert [v.improved for v in verdicts] == [True, True, True, True, True]
    assert [v.stop for v in verdicts] == [False, False, False, True, False]
    assert (counters.patience_epoch, counters.best_epoch) == (5, 5)


def test_the_monitors_direction_comes_from_its_name_or_monitor_mode():
    assert Monitor.of(TrainerConfig(monitor="val_f1"), 10).mode == "max"
    assert Monitor.of(TrainerConfig(monitor="val_loss"), 10).mode == "min"
    assert Monitor.of(TrainerConfig(monitor="val_acc", monitor_mode="min"), 10).mode == "min"
    with pytest.raises(ConfigError, match=r"trainer.monitor=val_top5 needs more than 5 classes"):
        Monitor.of(TrainerConfig(monitor="val_top5"), num_classes=3)


def test_a_misspelt_monitor_is_one_line_before_any_data(tmp_path: Path):
    done = run_cli([*TINY, "trainer.monitor=val_accuracy"], tmp_path)
    assert done.returncode == 2
    assert (
        "error: trainer.monitor='val_accuracy' is not allowed: use one of val_acc, val_loss, "
        "val_f1, val_top5"
    ) in done.stdout + done.stderr
    assert not (tmp_path / "outputs").exists()
