"""The CUDA path, run for real on a GPU (skipped without one): scripts/gpu_check.sh runs
these on the lent GPU machine. Each drives what a user would run."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from stable_cnn.config import ClippingConfig, CosineConfig, SGDConfig
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.system.hardware import Runtime, choose_precision
from stable_cnn.system.signals import EXIT_PREEMPTED
from stable_cnn.training.captured_step import GraphedTrainStep
from stable_cnn.training.epoch import train_one_epoch
from stable_cnn.training.host_syncs import step_waits
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.schedulers import build_schedule
from stable_cnn.training.step import TrainStep
from tests.conftest import TINY, run_cli
from tests.test_lr_find import RECIPE_TOOLS
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


def test_the_speedruns_recipe_tools_on_cuda(tmp_path: Path):
    """optimizer=muon (its Newton-Schulz in bf16 on the GPU, its skip on the device),
    mixup and cutmix, flip and translate TTA: a real run that learns."""
    done = run_cli([*ON_CUDA, *RECIPE_TOOLS, "amp=bf16", "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["device"].startswith("cuda") and results["test_acc"] > 30


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


@pytest.mark.parametrize(
    ("path", "amp"),
    [("eager", "fp16"), ("eager", "bf16"), ("compiled", "bf16"), ("graphed", "bf16")],
)
def test_no_host_read_or_sync_per_step_on_cuda(path: str, amp: str):
    """tests/test_host_reads.py on the GPU, with CUDA's own sync detector as a second
    witness, for the eager, compiled and captured step: 10 steps and 40 read and sync
    equally often (at the epoch's end only). scripts/host_syncs.py prints the same."""
    waits = step_waits(path, amp, torch.device("cuda"))
    assert (waits.reads_per_step, waits.syncs_per_step) == (0, 0)


def cuda_batches(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(size, 3, 32, 32, device=device, generator=generator),
             torch.randint(0, 10, (size,), device=device, generator=generator))
            for _ in range(count)]  # fmt: skip


def train_eagerly_and_captured(batches: list, amp: str, dropout: float, wrap=None) -> dict:
    """The same model, seed and batches trained by TrainStep and by GraphedTrainStep
    (``wrap`` around the model, if given): each kind's (final weights, epoch stats)."""
    device = torch.device("cuda")
    runtime = Runtime(device, choose_precision(amp, device), torch.channels_last)
    trained = {}
    for kind in (TrainStep, GraphedTrainStep):
        torch.manual_seed(0)
        model = SmallCNN(in_channels=3, width=8, dropout=dropout, head_dropout=dropout)
        model.to(device, memory_format=torch.channels_last)
        optimizer = build_optimizer(model, SGDConfig(lr=0.1))
        schedule = build_schedule(optimizer, CosineConfig(interval="step"), 1, len(batches))
        step = kind(model if wrap is None else wrap(model), nn.CrossEntropyLoss(), optimizer,
                    torch.amp.GradScaler("cuda", enabled=False),
                    ClippingConfig("norm", max_norm=1.0), runtime)  # fmt: skip
        stats, _ = train_one_epoch(step, batches, schedule, 0, 100, lambda s, v: None,
                                   progress_bar=False)  # fmt: skip
        assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
        trained[kind] = (model.state_dict(), stats)
    eager, captured = trained[TrainStep][0], trained[GraphedTrainStep][0]
    assert captured.keys() == eager.keys()
    for name, value in eager.items():
        torch.testing.assert_close(captured[name], value, msg=name)
    return trained


def test_the_captured_step_trains_like_the_eager_one():
    """trainer.cuda_graph=true replays one captured step: same weights as eager steps
    (no dropout, so no random draws), a per-step schedule still takes effect, and a NaN
    batch is still skipped inside the graph."""
    batches = cuda_batches(8, 32)
    batches[4][0][0, 0, 0, 0] = float("nan")
    trained = train_eagerly_and_captured(batches, "off", dropout=0.0)
    for _, stats in trained.values():
        assert stats.nonfinite_steps == 1 and stats.images == 7 * 32


def test_cuda_graph_run_from_the_command_line(tmp_path: Path):
    done = run_cli([*ON_CUDA, "amp=bf16", "trainer.cuda_graph=true", "hydra.run.dir=run"],
                   tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "captured in a CUDA graph" in done.stdout and "training eagerly" not in done.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_acc"] > 30


class ReadsTheHost(nn.Module):
    """A model whose forward pass reads a value on the host: fine eagerly, fatal to a
    capture (the read waits for a stream that only records)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.abs().max().item() > 1e30:
            raise AssertionError("never: the read is the point")
        return self.model(images)


def test_a_failed_capture_trains_on_eagerly_as_if_never_tried(caplog):
    """trainer.cuda_graph=true on a step that syncs: one warning naming the real cause
    (not capture_end's generic message), the default stream current again, the CUDA
    generator out of capture mode and at the state it had (dropout draws the masks an
    eager run draws), so the weights equal eager training's."""
    train_eagerly_and_captured(cuda_batches(4, 16), "bf16", dropout=0.2, wrap=ReadsTheHost)
    warnings = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "training eagerly" in warnings[0]
    assert "stream is capturing" in warnings[0], warnings[0]  # the cause: the step's read
    torch.rand(8, device="cuda")  # the generator is usable outside a capture


def test_global_batchnorm_never_makes_the_host_wait(monkeypatch: pytest.MonkeyPatch):
    """model.sync_batchnorm=true's layer on the GPU: forward and backward through its
    global path (a one-process NCCL group, told it has two members so that the global
    path runs) raise nothing under torch.cuda.set_sync_debug_mode("error"); torch's
    own SyncBatchNorm syncs three times per layer there."""
    import socket

    import torch.distributed as dist

    from stable_cnn.models.global_batchnorm import GlobalBatchNorm

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))  # fmt: skip
    try:
        device = torch.device("cuda", 0)
        torch.manual_seed(0)
        plain = SmallCNN(in_channels=3, width=8, dropout=0.0, head_dropout=0.0)
        plain.to(device, memory_format=torch.channels_last)
        torch.manual_seed(0)
        model = SmallCNN(in_channels=3, width=8, dropout=0.0, head_dropout=0.0)
        model = GlobalBatchNorm.convert(model.to(device, memory_format=torch.channels_last))
        monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
        images = torch.randn(32, 3, 32, 32, device=device).contiguous(
            memory_format=torch.channels_last
        )
        # NCCL's communicator is made at the first call; alone, the global batch is ours
        torch.testing.assert_close(model(images), plain(images), atol=1e-4, rtol=1e-4)
        model(images).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(images)
                out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        monkeypatch.undo()  # the group's own teardown asks its real size
        dist.destroy_process_group()


def test_stable_cnn_eval_keeps_the_training_images_off_the_gpu(tmp_path: Path):
    """Testing a checkpoint needs its test split on the GPU, not the training split."""
    from omegaconf import OmegaConf

    from stable_cnn.data.splits import DatasetInfo
    from stable_cnn.state.checkpoint import save_checkpoint
    from stable_cnn.training.build import build_model, model_config
    from stable_cnn.training.evaluation import load_for_evaluation, training_accuracy
    from tests.conftest import compose_config, compose_run

    overrides = [*TINY, "data.num_train=2048"]
    run = compose_run(overrides)
    info = DatasetInfo("synthetic", 1, 10, 28, tuple(f"class_{k}" for k in range(10)))
    model = build_model(run, info)
    path = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model_config(run, info),
                     "config": OmegaConf.to_container(compose_config(overrides), resolve=True)},
                    path)  # fmt: skip
    loaded = load_for_evaluation(path, None, "cuda")
    assert loaded.splits.test.images.is_cuda and not loaded.splits.train.images.is_cuda
    assert 0 <= training_accuracy(path, count=512, device_name="cuda") <= 100


def test_an_image_folder_run_on_cuda(tmp_path: Path):
    """The classic DataLoader path on a GPU: pinned batches, persistent workers."""
    from tests.test_data import write_image_folder

    write_image_folder(tmp_path / "images", {"train": {"cat": 40, "dog": 40},
                                             "val": {"cat": 10, "dog": 10}})  # fmt: skip
    done = run_cli(["data=image_folder", f"data.root={tmp_path / 'images'}", "data.batch_size=16",
                    "data.image_size=16", "model.width=8", "trainer.epochs=2",
                    "trainer.device=cuda", "data.num_workers=2", "hydra.run.dir=run"],
                   tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 loader workers" in done.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 2
