"""Counting the moments the host waits for the device: every read of a tensor's value
by Python (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``int()``, ``.numpy()``),
and, on CUDA, every synchronisation torch's sync debug mode reports (which also catches
those inside torch, such as boolean-mask indexing or a blocking host-to-device copy).

A training step should have neither: the tests and ``scripts/host_syncs.py`` count
them over 10 steps and over 40, and the difference belongs to the steps.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from stable_cnn.config import ClippingConfig, CosineConfig, SGDConfig
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.system.hardware import Runtime, choose_precision, compile_model
from stable_cnn.training.captured_step import build_train_step
from stable_cnn.training.epoch import EpochLoop, EpochSettings, train_one_epoch
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.schedulers import build_schedule

# Every way Python reads a tensor's value; on a GPU each one waits for the device.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
CUDA_SYNCS = "cuda_syncs"  # the key under which CUDA's own count is added


@contextmanager
def counting_host_waits(device: torch.device | None = None) -> Iterator[Counter]:
    """Count host reads by method name while the body runs; on a CUDA ``device``, also
    the syncs that torch.cuda.set_sync_debug_mode reports, added under ``CUDA_SYNCS``
    when the body ends. Counts can be cleared in between (``counts.clear()``)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    for name, original in originals.items():

        def counted(self, *args, __original=original, __name=name, **kwargs):
            counts[__name] += 1
            return __original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)  # what was queued before is not the body's
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if on_cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counts
            finally:
                if on_cuda:
                    torch.cuda.set_sync_debug_mode("default")
        if on_cuda:
            counts[CUDA_SYNCS] += sum("synchroniz" in str(w.message) for w in caught)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_reads(counts: Counter) -> int:
    """The reads by Python among ``counts`` (CUDA's own count left out)."""
    return sum(count for name, count in counts.items() if name != CUDA_SYNCS)


@dataclass(frozen=True)
class StepWaits:
    reads_per_step: float  # host reads of tensor values
    syncs_per_step: float  # CUDA syncs (0 off CUDA: nothing to count)
    epoch_reads: int  # host reads in a whole epoch of SHORT steps (its end's)


SHORT, LONG = 10, 40  # epochs counted; their difference belongs to LONG - SHORT steps


def step_waits(path: str, precision: str, device: torch.device) -> StepWaits:
    """What one training step of the SmallCNN (width 16, batch 64, CIFAR-sized, SGD with
    clipping, a per-step cosine schedule) makes the host wait for, on ``path`` (eager,
    compiled or graphed) at ``precision`` (an ``amp`` value)."""
    reads_short, syncs_short = waits_in_an_epoch(path, precision, SHORT, device)
    reads_long, syncs_long = waits_in_an_epoch(path, precision, LONG, device)
    steps = LONG - SHORT
    return StepWaits(
        (reads_long - reads_short) / steps, (syncs_long - syncs_short) / steps, reads_short
    )


def waits_in_an_epoch(path: str, amp: str, steps: int, device: torch.device) -> tuple[int, int]:
    """(host reads, CUDA syncs) of one epoch of ``steps`` steps, with a fresh model."""
    torch.manual_seed(0)
    precision = choose_precision(amp, device)
    runtime = Runtime(device, precision, torch.channels_last)
    model = SmallCNN(in_channels=3, width=16).to(device, memory_format=torch.channels_last)
    network = compile_model(model, device) if path == "compiled" else model
    optimizer = build_optimizer(model, SGDConfig())
    schedule = build_schedule(optimizer, CosineConfig(interval="step"), 1, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
    train_step = build_train_step(
        network,
        nn.CrossEntropyLoss(),
        optimizer,
        scaler,
        ClippingConfig("norm", max_norm=1.0),
        runtime,
        2.0,
        cuda_graph=path == "graphed",
        cycles_momentum=False,
    )
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [
        (
            torch.randn(64, 3, 32, 32, device=device, generator=generator),
            torch.randint(0, 10, (64,), device=device, generator=generator),
        )
        for _ in range(steps)
    ]
    with counting_host_waits(device) as counts:
        train_one_epoch(EpochLoop(train_step, batches, schedule), EpochSettings(10_000), 0)
    return host_reads(counts), counts[CUDA_SYNCS]
