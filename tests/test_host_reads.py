"""No host read of a tensor value per training step: on a GPU each one stalls the device.

Every way Python reads a tensor's value (``.item()``, ``.tolist()``, ``bool()``,
``float()``, ``int()``, ``.numpy()``) is wrapped with a counter; the training loop may
read only at log intervals and at the end of an epoch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from stable_cnn.config import ClippingConfig, CosineConfig, MuonConfig, SGDConfig
from stable_cnn.data.augment import BatchMixing
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.system.hardware import FP32, Runtime
from stable_cnn.training import fit as train_module
from stable_cnn.training.epoch import EpochLoop, EpochSettings, train_one_epoch
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.schedulers import build_schedule
from stable_cnn.training.step import TrainStep
from tests.conftest import compose_run


def epoch_reads(
    host_reads: Counter, batches: int, log_every: int, policy: str = "skip", tools: bool = False
) -> int:
    """Host reads in one epoch of ``batches`` steps; ``tools``: with optimizer=muon and
    mixup/cutmix (the speedrun's recipe tools)."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=4)
    generator = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(16, 1, 16, 16, generator=generator),
            torch.randint(0, 10, (16,), generator=generator),
        )
        for _ in range(batches)
    ]
    optimizer = build_optimizer(model, MuonConfig() if tools else SGDConfig())
    mixing = BatchMixing(10, mixup_alpha=0.2, cutmix_alpha=1.0) if tools else None
    schedule = build_schedule(optimizer, CosineConfig(interval="step"), 1, batches)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    runtime = Runtime(torch.device("cpu"), FP32, torch.contiguous_format)
    host_reads.clear()
    clipping = ClippingConfig("norm", max_norm=1.0)
    train_step = TrainStep(
        model, nn.CrossEntropyLoss(), optimizer, scaler, clipping, runtime, mixing=mixing
    )
    settings = EpochSettings(log_every_n_steps=log_every, on_nonfinite=policy)
    train_one_epoch(EpochLoop(train_step, data, schedule), settings, 0)
    return sum(host_reads.values())


def test_an_epoch_reads_the_same_whatever_its_length(host_reads: Counter):
    """10 steps or 40: the same reads (the epoch's end), so none belongs to a step."""
    assert epoch_reads(host_reads, 10, log_every=1000) == epoch_reads(
        host_reads, 40, log_every=1000
    )
    # one read per log interval: 40 steps logged every 10 read 4 more times
    assert (
        epoch_reads(host_reads, 40, log_every=10) == epoch_reads(host_reads, 40, log_every=1000) + 4
    )
    # Muon's step (judged on the device like a fused one) and the mixing's draws: none
    assert epoch_reads(host_reads, 10, 1000, tools=True) == epoch_reads(
        host_reads, 40, 1000, tools=True
    )
    # on_nonfinite=stop must look at every step, and says so in the README
    assert (
        epoch_reads(host_reads, 40, 1000, "stop") - epoch_reads(host_reads, 10, 1000, "stop") == 30
    )


def test_a_real_run_reads_under_a_quarter_per_step(
    host_reads: Counter, fashion_mnist_root: Path, tmp_path: Path
):
    """The issue's measure: the CLI's train() for 1 and for 2 epochs on real data; the
    extra epoch (its steps, validation, logging and checkpoints) costs < 0.25 reads/step."""

    def reads_for(epochs: int) -> tuple[int, int]:
        run = compose_run(
            [
                f"data.root={fashion_mnist_root}",
                "data.limit_train=12000",
                "model.width=8",
                f"trainer.epochs={epochs}",
                "trainer.log_every_n_steps=100000",
                "trainer.progress_bar=false",
                "diagnostics.figures_every_n_epochs=null",
            ]
        )
        host_reads.clear()
        results = train_module.train(run, tmp_path / f"epochs{epochs}", {})
        return sum(host_reads.values()), results["global_step"]

    one_epoch, steps_one = reads_for(1)
    two_epochs, steps_two = reads_for(2)
    per_step = (two_epochs - one_epoch) / (steps_two - steps_one)
    print(f"host reads: {two_epochs - one_epoch} in one epoch of {steps_two - steps_one} steps")
    assert steps_two - steps_one == 12000 // 128
    assert per_step <= 0.25, f"{two_epochs - one_epoch} host reads in one epoch of 93 steps"
