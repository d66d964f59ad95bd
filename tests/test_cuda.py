"""The CUDA path, run for real on a GPU (skipped without one): scripts/gpu_check.sh runs
these on the lent GPU machine. Each drives what a user would run."""

from __future__ import annotations

import json
import signal
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from stable_cnn.capture import GraphedTrainStep
from stable_cnn.config import ClippingConfig, CosineConfig, SGDConfig
from stable_cnn.engine import train_one_epoch
from stable_cnn.hardware import Runtime, choose_precision
from stable_cnn.models import SmallCNN
from stable_cnn.optimizers import build_optimizer
from stable_cnn.preemption import EXIT_PREEMPTED
from stable_cnn.schedulers import build_schedule
from stable_cnn.step import TrainStep
from tests.conftest import TINY, run_cli
from tests.test_resume import RESUMABLE, assert_same_run, start, wait_for_epochs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# TINY on the GPU, with enough data and no dropout to learn in two epochs (55% on a CPU)
ON_CUDA = [arg for arg in TINY if arg != "trainer.device=cpu"] + [
    "trainer.device=cuda", "data.num_train=3000", "model.dropout=0", "model.head_dropout=0",
]  # fmt: skip
RESUMABLE_ON_CUDA = [arg for arg in RESUMABLE if arg != "trainer.device=cpu"]


@pytest.mark.parametrize("amp", ["fp16", "bf16", "auto"])
def test_a_short_real_run_on_cuda(amp: str, tmp_path: Path):
    done = run_cli([*ON_CUDA, f"amp={amp}", "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    expected = choose_precision(amp, torch.device("cuda")).name
    assert results["device"].startswith("cuda") and results["precision"] == expected
    assert results["test_acc"] > 30  # chance is 10%


def test_channels_last_and_compile_on_cuda(tmp_path: Path):
    done = run_cli([*ON_CUDA, "trainer.channels_last=true", "trainer.compile=true",
                    "hydra.run.dir=run"], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiling failed" not in done.stdout and "ignored" not in done.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_acc"] > 30


def test_exact_resume_on_cuda_with_deterministic_kernels(tmp_path: Path):
    uninterrupted = tmp_path / "uninterrupted"
    done = run_cli([*RESUMABLE_ON_CUDA, "trainer.device=cuda",
                    f"hydra.run.dir={uninterrupted}"], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "preempted"
    process = start(run_dir, "trainer.device=cuda")
    wait_for_epochs(run_dir, 1, process)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == EXIT_PREEMPTED
    resumed = start(run_dir, "trainer.device=cuda", f"trainer.resume={run_dir}")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert_same_run(uninterrupted, run_dir)

    # A 0.1 checkpoint saved every visible GPU's random state; resumed where fewer GPUs
    # are visible (a requeue onto another node) it raised IndexError.
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    state["rng"]["cuda"] = [state["rng"]["cuda"]] * (torch.cuda.device_count() + 3)
    moved = tmp_path / "moved" / "checkpoints"
    moved.mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        torch.save(state, moved / name)
    done = run_cli([*RESUMABLE_ON_CUDA, "trainer.device=cuda",
                    f"trainer.resume={moved / 'last.pt'}"], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def sync_warnings(batches: int, amp: str) -> int:
    """Host-device syncs (torch.cuda.set_sync_debug_mode's warnings) in one epoch."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, width=16).to(device, memory_format=torch.channels_last)
    data = [(torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device))
            for _ in range(batches)]  # fmt: skip
    optimizer = build_optimizer(model, SGDConfig())
    schedule = build_schedule(optimizer, CosineConfig(interval="step"), 1, batches)
    precision = choose_precision(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.use_grad_scaler)
    runtime = Runtime(device, precision, torch.channels_last)
    clipping = ClippingConfig("norm", max_norm=1.0)
    train_step = TrainStep(model, nn.CrossEntropyLoss(), optimizer, scaler, clipping, runtime)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_one_epoch(
                train_step,
                data,
                schedule,
                0,
                10_000,
                lambda step, scalars: None,
                progress_bar=False,
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_no_host_read_or_sync_per_step_on_cuda(amp: str, host_reads: Counter):
    """tests/test_host_reads.py on the GPU, and CUDA's own sync detector as a second
    witness: 10 steps and 40 read and sync equally often (at the epoch's end only)."""
    host_reads.clear()
    syncs_10 = sync_warnings(10, amp)
    reads_10 = sum(host_reads.values())
    host_reads.clear()
    syncs_40 = sync_warnings(40, amp)
    assert sum(host_reads.values()) == reads_10
    assert syncs_40 == syncs_10


def test_the_captured_step_trains_like_the_eager_one():
    """trainer.cuda_graph=true replays one captured step: same weights as eager steps
    (no dropout, so no random draws), a per-step schedule still takes effect, and a NaN
    batch is still skipped inside the graph."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(32, 3, 32, 32, device=device, generator=generator),
                torch.randint(0, 10, (32,), device=device, generator=generator))
               for _ in range(8)]  # fmt: skip
    batches[4][0][0, 0, 0, 0] = float("nan")
    runtime = Runtime(device, choose_precision("off", device), torch.channels_last)
    trained = {}
    for kind in (TrainStep, GraphedTrainStep):
        torch.manual_seed(0)
        model = SmallCNN(in_channels=3, width=8, dropout=0.0, head_dropout=0.0)
        model.to(device, memory_format=torch.channels_last)
        optimizer = build_optimizer(model, SGDConfig(lr=0.1))
        schedule = build_schedule(optimizer, CosineConfig(interval="step"), 1, len(batches))
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        step = kind(model, nn.CrossEntropyLoss(), optimizer, scaler,
                    ClippingConfig("norm", max_norm=1.0), runtime)  # fmt: skip
        stats, _ = train_one_epoch(step, batches, schedule, 0, 100, lambda s, v: None,
                                   progress_bar=False)  # fmt: skip
        assert stats.nonfinite_steps == 1 and stats.images == 7 * 32
        trained[kind] = model.state_dict()
    assert trained[GraphedTrainStep].keys() == trained[TrainStep].keys()
    for name, value in trained[TrainStep].items():
        torch.testing.assert_close(trained[GraphedTrainStep][name], value, msg=name)


def test_cuda_graph_run_from_the_command_line(tmp_path: Path):
    done = run_cli([*ON_CUDA, "amp=bf16", "trainer.cuda_graph=true", "hydra.run.dir=run"],
                   tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "captured in a CUDA graph" in done.stdout and "training eagerly" not in done.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_acc"] > 30
