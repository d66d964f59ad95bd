"""Weight EMA (ema=on): the average's arithmetic, and a run that keeps, tests, hands on
and resumes the average."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stable_cnn.errors import EXIT_PREEMPTED
from stable_cnn.models.ema import WeightEMA
from stable_cnn.models.small_cnn import SmallCNN
from tests.conftest import read_jsonl, run_cli
from tests.test_resume import RESUMABLE, assert_same_run, start, wait_for_epochs


def test_the_average_follows_the_weights_with_a_warm_up():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=4)
    ema = WeightEMA(model, decay=0.9, warmup=True)
    start_weight = model.classifier[2].weight.detach().clone()
    decays = []
    for step in range(1, 101):
        decays.append(ema.decay_at(step))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            model.stage1[0][1].running_mean.add_(1.0)
        ema.update(step)
    assert decays[:3] == pytest.approx([1 / 10, 2 / 11, 3 / 12]) and decays[-1] == 0.9
    # averaged by hand: a <- d a + (1 - d) w, with w = start + k after k updates
    expected = start_weight.clone()
    for k, decay in enumerate(decays, start=1):
        expected = decay * expected + (1 - decay) * (start_weight + k)
    torch.testing.assert_close(ema.model.classifier[2].weight, expected)
    assert ema.model.stage1[0][1].running_mean.mean() > 50, "BatchNorm statistics averaged"
    assert int(ema.model.stage1[0][1].num_batches_tracked) == int(
        model.stage1[0][1].num_batches_tracked
    )
    assert not any(p.requires_grad for p in ema.model.parameters())

    copy = WeightEMA(SmallCNN(in_channels=1, width=4), decay=0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.decay_at(101) == 0.9
    torch.testing.assert_close(copy.model.classifier[2].weight, expected)


def test_without_warm_up_the_decay_is_fixed():
    ema = WeightEMA(SmallCNN(in_channels=1, width=4), decay=0.99, warmup=False)
    assert ema.decay_at(1) == 0.99


EMA_RUN = [*RESUMABLE, "ema=on", "ema.decay=0.99"]


@pytest.mark.slow
def test_an_ema_run_keeps_tests_hands_on_and_resumes_the_average(tmp_path: Path):
    """One run validates, selects by, tests and hands on the average (eval finds it); one
    stopped by SIGTERM and resumed ends with the same average."""
    uninterrupted = tmp_path / "uninterrupted"
    done = run_cli([*EMA_RUN, f"hydra.run.dir={uninterrupted}"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = read_jsonl(uninterrupted / "metrics.jsonl")
    assert all({"val_acc", "val_acc_ema", "val_loss_ema", "val_f1_ema"} <= set(m) for m in metrics)
    results = json.loads((uninterrupted / "results.json").read_text())
    assert results["weights"] == "ema"
    assert results["best_val_acc"] == max(m["val_acc_ema"] for m in metrics), "selected by EMA"
    events = EventAccumulator(str(uninterrupted))
    events.Reload()
    assert {"accuracy/val", "accuracy/val_ema", "loss/val_ema"} <= set(events.Tags()["scalars"])
    assert "val_acc_ema" in done.stdout

    evaluate = str(Path(sys.executable).parent / "stable-cnn-eval")
    out_dir = tmp_path / "eval"
    checked = subprocess.run(
        [evaluate, f"checkpoint={uninterrupted}", f"out={out_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    evaluated = json.loads((out_dir / "eval.json").read_text())
    assert evaluated["weights"] == "ema" and evaluated["test_acc"] == results["test_acc"]

    run_dir = tmp_path / "preempted"
    process = start(run_dir, "ema=on", "ema.decay=0.99")
    wait_for_epochs(run_dir, 1, process)
    time.sleep(0.2)  # into epoch 2
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == EXIT_PREEMPTED
    resumed = start(run_dir, "ema=on", "ema.decay=0.99", f"trainer.resume={run_dir}")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert_same_run(uninterrupted, run_dir)
    averages = [
        torch.load(d / "checkpoints" / "last.pt", weights_only=True)["ema"]["model"]
        for d in (uninterrupted, run_dir)
    ]
    assert all(torch.equal(averages[0][k], averages[1][k]) for k in averages[0])
