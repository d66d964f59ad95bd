"""NaN/Inf losses and gradients: skipped and counted, or stopped with a checkpoint saved."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stable_cnn.config import ClippingConfig, SchedulerConfig, SGDConfig
from stable_cnn.errors import EXIT_FAILED
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.state.progress import SLOT
from stable_cnn.system.hardware import FP32, Runtime
from stable_cnn.training.epoch import EpochLoop, EpochSettings, train_one_epoch
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.schedulers import build_schedule
from stable_cnn.training.step import TrainStep
from tests.conftest import TINY, run_cli

CPU = Runtime(torch.device("cpu"), FP32, torch.contiguous_format)


def batches_with_a_nan_image(count: int, poisoned: set[int]) -> list:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(count):
        images = torch.randn(8, 1, 16, 16, generator=generator)
        if index in poisoned:
            images[3, 0, 5, 5] = float("nan")
        batches.append((images, torch.randint(0, 10, (8,), generator=generator)))
    return batches


def run_epoch(
    batches: list, policy: str, limit: int = 10, log_every: int = 100, dropout: float = 0.3
):
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=8, dropout=dropout, head_dropout=dropout)
    optimizer = build_optimizer(model, SGDConfig(lr=0.01))
    schedule = build_schedule(optimizer, SchedulerConfig("none"), 1, len(batches))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step = TrainStep(
        model, nn.CrossEntropyLoss(), optimizer, scaler, ClippingConfig("norm", max_norm=1.0), CPU
    )
    settings = EpochSettings(log_every, on_nonfinite=policy, max_consecutive_nonfinite=limit)
    stats, _ = train_one_epoch(EpochLoop(train_step, batches, schedule), settings, 0)
    return model, stats


def test_skip_drops_the_bad_step_and_keeps_training():
    model, stats = run_epoch(batches_with_a_nan_image(6, poisoned={2}), "skip")
    assert stats.completed and stats.nonfinite_steps == 1 and stats.global_step == 6
    assert math.isfinite(stats.loss) and stats.images == 5 * 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers()), "BatchNorm stats unpoisoned"


def test_stop_ends_the_epoch_at_the_bad_step():
    _, stats = run_epoch(batches_with_a_nan_image(6, poisoned={2}), "stop")
    assert not stats.completed and stats.global_step == 3
    assert stats.stop_reason == "non-finite loss at step 3"


def test_skip_gives_up_after_too_many_in_a_row():
    """The limit is checked on the host at each log interval and at the epoch's end (no
    read per step): with a check every 2 steps it is seen at step 4, after 3 in a row."""
    batches = batches_with_a_nan_image(8, poisoned={1, 2, 3, 4})
    _, stats = run_epoch(batches, "skip", limit=3, log_every=2)
    assert stats.stop_reason == "3 non-finite steps in a row (by step 4)"
    _, stats = run_epoch(batches, "skip", limit=3, log_every=100)
    assert stats.stop_reason == "4 non-finite steps in a row (by step 8)"
    assert stats.nonfinite_steps == 4 and stats.images == 4 * 8


def test_a_skipped_step_changes_nothing_even_the_first():
    """Skipping happens inside the fused optimizer (found_inf) and by a device-side select
    for BatchNorm: weights, momentum and running statistics stay exactly as they were.
    A skipped first step must not leave the fused SGD's momentum uninitialised."""
    batches = batches_with_a_nan_image(3, poisoned={0})
    torch.manual_seed(0)
    reference = SmallCNN(in_channels=1, width=8)
    # no dropout: the skipped forward pass would draw masks and shift the random stream
    skipped_model, stats = run_epoch(batches, "skip", dropout=0.0)
    clean_model, _ = run_epoch(batches[1:], "skip", dropout=0.0)
    assert stats.nonfinite_steps == 1
    for name, value in clean_model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(skipped_model.state_dict()[name], value, msg=name)
    # and the skipped step really was skipped: the BN counters count 2 batches, not 3
    counters = [b for n, b in skipped_model.named_buffers() if n.endswith("num_batches_tracked")]
    assert all(int(b) == 2 for b in counters)
    assert not torch.equal(reference.stage1[0][0].weight, skipped_model.stage1[0][0].weight)


@pytest.mark.slow
def test_cli_stop_policy_saves_and_names_epoch_and_step(tmp_path):
    # lr 1e6 without clipping overflows within a few steps.
    args = [
        *TINY,
        "optimizer.lr=1e6",
        "clipping=none",
        "amp=off",
        "trainer.on_nonfinite=stop",
        "hydra.run.dir=run",
    ]
    done = run_cli(args, tmp_path)
    assert done.returncode == EXIT_FAILED, "diverged: not a mistake in the input (exit 2)"
    (error,) = [line for line in done.stdout.splitlines() if "error:" in line]
    assert "non-finite" in error and "stopped in epoch 1 at step" in error
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_cli_skips_counts_and_then_gives_up(tmp_path):
    # A nearly-zero std turns every image into +-inf: every step is skipped, counted,
    # and the first check after max_consecutive_nonfinite (every log interval, here 2
    # steps) stops the run with one line.
    args = [
        *TINY,
        "data.std=[1e-40]",
        "amp=off",
        "trainer.max_consecutive_nonfinite=3",
        "hydra.run.dir=run",
    ]
    done = run_cli(args, tmp_path)
    assert done.returncode == EXIT_FAILED
    assert "4 non-finite steps in a row (by step 4)" in done.stdout
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["values"][SLOT["nonfinite_steps"]] >= 3
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "no epoch completed"
