"""What a run resolves from the machine (precision, RNG streams, compiler) and what a
resume must find again: the fixes that make the CUDA and resume paths trustworthy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stable_cnn.data.build import build_splits
from stable_cnn.state.resume import cuda_state_for, rng_state
from stable_cnn.system.hardware import choose_precision
from stable_cnn.system.seeding import seed_everything, stream_seed
from tests.conftest import TINY, compose_run, run_cli

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("capability", "expected", "scaler"),
    [
        ((7, 0), "fp16", True),
        ((7, 5), "fp16", True),
        ((8, 0), "bf16", False),
        ((9, 0), "bf16", False),
    ],
)
def test_amp_auto_on_cuda_is_bf16_from_ampere_on(capability, expected, scaler):
    precision = choose_precision("auto", CUDA, cuda_capability=capability)
    assert (precision.name, precision.use_grad_scaler) == (expected, scaler)
    assert f"{capability[0]}.{capability[1]}" in precision.reason, "the log says why"


def test_explicit_amp_is_kept_on_any_gpu():
    assert choose_precision("fp16", CUDA, cuda_capability=(9, 0)).name == "fp16"
    assert choose_precision("off", CUDA, cuda_capability=(9, 0)).name == "fp32"


def test_a_checkpoint_keeps_only_its_own_gpus_random_state():
    """A requeued job may see fewer GPUs than the one that saved: 0.1 checkpoints held
    every visible GPU's state, and restoring them all raised IndexError."""
    assert "cuda" not in rng_state(torch.device("cpu"))
    saved_on_four = [torch.full((8,), k, dtype=torch.uint8) for k in range(4)]
    assert torch.equal(cuda_state_for(saved_on_four, torch.device("cuda:2")), saved_on_four[2])
    assert torch.equal(cuda_state_for(saved_on_four, torch.device("cuda")), saved_on_four[0])
    assert torch.equal(cuda_state_for(saved_on_four[:1], torch.device("cuda:3")), saved_on_four[0])
    assert cuda_state_for(saved_on_four, torch.device("cpu")) is None


def test_dropout_and_augmentation_draw_from_different_streams():
    """One trainer.seed, two streams: the model's (init, dropout) and the data's (order,
    crops, flips). Seeded with the same integer they drew the very same bits."""
    run = compose_run(TINY)
    seed_everything(run.trainer.seed, deterministic=False)
    data = build_splits(run.data, torch.device("cpu"), run.trainer.seed)
    model_bits = torch.rand(1000)
    data_bits = torch.rand(1000, generator=data.train.generator)
    assert not torch.equal(model_bits, data_bits)
    assert stream_seed(0, "data") == stream_seed(0, "data") != stream_seed(1, "data")
    seed_everything(run.trainer.seed, deterministic=False)
    assert torch.equal(torch.rand(1000), model_bits), "still reproducible from the seed"


@pytest.mark.slow
def test_compiler_failure_at_the_first_forward_falls_back_to_eager(tmp_path: Path):
    """torch.compile() returns at once; the compiler runs at the first forward pass. A
    broken C++ compiler there (CXX=/bin/false) must cost a warning, not the run."""
    done = run_cli(
        [*TINY, "trainer.compile=true", "trainer.epochs=1", "hydra.run.dir=run"],
        tmp_path,
        env={"CXX": "/bin/false"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in done.stdout.splitlines() if "compiling failed" in line]
    assert len(warnings) == 1 and "training eagerly" in warnings[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_acc"] > 0


def test_cuda_graph_off_cuda_is_one_warning_and_an_eager_step(caplog):
    from stable_cnn.config import ClippingConfig, SGDConfig
    from stable_cnn.models.small_cnn import SmallCNN
    from stable_cnn.system.hardware import FP32, Runtime
    from stable_cnn.training.captured_step import GraphedTrainStep, build_train_step
    from stable_cnn.training.optimizers import build_optimizer

    model = SmallCNN(in_channels=1, width=4)
    optimizer = build_optimizer(model, SGDConfig())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    runtime = Runtime(torch.device("cpu"), FP32, torch.contiguous_format)
    step = build_train_step(
        model,
        torch.nn.CrossEntropyLoss(),
        optimizer,
        scaler,
        ClippingConfig("none"),
        runtime,
        2.0,
        cuda_graph=True,
        cycles_momentum=False,
    )
    assert not isinstance(step, GraphedTrainStep)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "trainer.cuda_graph=true ignored: CUDA graphs need a CUDA device, not cpu; training eagerly"
    ]


def test_compile_really_compiles_on_the_cpu_and_trains_like_eager():
    """trainer.compile=true on this CPU (inductor's C++ backend, about 20 s to compile):
    the compiled model trains a whole epoch without falling back, and its per-step
    losses equal eager's (no dropout, so no random draws; float tolerance)."""
    from torch import nn

    from stable_cnn.config import ClippingConfig, CosineConfig, SGDConfig
    from stable_cnn.models.small_cnn import SmallCNN
    from stable_cnn.system.hardware import FP32, CompiledWithFallback, Runtime, compile_model
    from stable_cnn.training.epoch import EpochLoop, EpochSettings, train_one_epoch
    from stable_cnn.training.optimizers import build_optimizer
    from stable_cnn.training.schedulers import build_schedule
    from stable_cnn.training.step import TrainStep

    runtime = Runtime(torch.device("cpu"), FP32, torch.contiguous_format)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(16, 1, 16, 16, generator=generator),
            torch.randint(0, 10, (16,), generator=generator),
        )
        for _ in range(6)
    ]
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = SmallCNN(in_channels=1, width=4, dropout=0.0, head_dropout=0.0)
        network = compile_model(model, runtime.device) if compiled else model
        optimizer = build_optimizer(model, SGDConfig(lr=0.05))
        schedule = build_schedule(optimizer, CosineConfig(interval="step"), 1, len(batches))
        step = TrainStep(
            network,
            nn.CrossEntropyLoss(),
            optimizer,
            torch.amp.GradScaler("cpu", enabled=False),
            ClippingConfig("norm", max_norm=1.0),
            runtime,
        )
        logged = losses[compiled] = []

        def log(_: int, scalars: dict, logged: list = logged) -> None:
            logged.append(scalars["loss/train"])

        train_one_epoch(EpochLoop(step, batches, schedule, log), EpochSettings(1), 0)
        if compiled:
            assert isinstance(network, CompiledWithFallback) and network.compiled is not None
    assert len(losses[True]) == len(batches)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
