"""The CUDA path, run for real on a GPU (skipped without one): scripts/gpu_check.sh runs
these on the lent GPU machine. Each drives what a user would run.

Every command line and object here comes from a helper that takes the device:
tests/test_gpu_path_on_cpu.py calls the same helpers on the CPU on every CI run, so
that this module cannot go stale between GPU runs."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from stable_cnn.config import ClippingConfig, CosineConfig, SGDConfig
from stable_cnn.data.splits import DatasetInfo
from stable_cnn.errors import EXIT_PREEMPTED
from stable_cnn.models.build import build_model
from stable_cnn.models.global_batchnorm import GlobalBatchNorm
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.state.checkpoint import save_checkpoint
from stable_cnn.system.hardware import Runtime, choose_precision
from stable_cnn.training.build import model_config
from stable_cnn.training.captured_step import GraphedTrainStep
from stable_cnn.training.epoch import EpochLoop, EpochSettings, EpochStats, train_one_epoch
from stable_cnn.training.evaluation import load_for_evaluation, training_accuracy
from stable_cnn.training.host_syncs import step_waits
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.schedulers import build_schedule
from stable_cnn.training.step import TrainStep
from tests.conftest import TINY, compose_config, compose_run, run_cli
from tests.test_lr_find import RECIPE_TOOLS
from tests.test_resume import RESUMABLE, assert_same_run, start, wait_for_epochs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


# enough data and no dropout to learn in two epochs (55% on a CPU)
LEARNS = ["data.num_train=3000", "model.dropout=0", "model.head_dropout=0"]


def on_device(device: str) -> list[str]:
    """TINY on ``device``, set to learn (``LEARNS``)."""
    tiny = [arg for arg in TINY if not arg.startswith("trainer.device=")]
    return [*tiny, f"trainer.device={device}", *LEARNS]


ON_CUDA = on_device("cuda")
AMP_OPTIONS = ["fp16", "bf16", "auto"]
RECIPE = [*RECIPE_TOOLS, "amp=bf16"]
COMPILED = ["trainer.channels_last=true", "trainer.compile=true"]
GRAPHED = ["amp=bf16", "trainer.cuda_graph=true"]


def resumable_on(device: str) -> list[str]:
    return [*RESUMABLE, f"trainer.device={device}"]  # the last trainer.device wins


RESUMABLE_ON_CUDA = resumable_on("cuda")


def image_folder_run(root: Path, device: str) -> list[str]:
    return [
        "data=image_folder",
        f"data.root={root}",
        "data.batch_size=16",
        "data.image_size=16",
        "model.width=8",
        "trainer.epochs=2",
        f"trainer.device={device}",
        "data.num_workers=2",
    ]


def command_lines(device: str, images: Path) -> list[list[str]]:
    """Every command line this module runs (less its hydra.run.dir), on ``device``."""
    return [
        *([*on_device(device), f"amp={amp}"] for amp in AMP_OPTIONS),
        [*on_device(device), *RECIPE],
        [*on_device(device), *COMPILED],
        [*on_device(device), *GRAPHED],
        resumable_on(device),
        image_folder_run(images, device),
    ]


@pytest.mark.parametrize("amp", AMP_OPTIONS)
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
    done = run_cli([*ON_CUDA, *RECIPE, "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["device"].startswith("cuda") and results["test_acc"] > 30


def test_channels_last_and_compile_on_cuda(tmp_path: Path):
    done = run_cli([*ON_CUDA, *COMPILED, "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiling failed" not in done.stdout and "ignored" not in done.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_acc"] > 30


def test_exact_resume_on_cuda_with_deterministic_kernels(tmp_path: Path):
    uninterrupted = tmp_path / "uninterrupted"
    done = run_cli([*RESUMABLE_ON_CUDA, f"hydra.run.dir={uninterrupted}"], tmp_path)
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
    done = run_cli([*RESUMABLE_ON_CUDA, f"trainer.resume={moved / 'last.pt'}"], tmp_path)
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


def random_batches(count: int, size: int, device: torch.device) -> list[tuple]:
    """``count`` batches of ``size`` CIFAR-sized images and labels, drawn on ``device``."""
    generator = torch.Generator(device=device).manual_seed(0)
    return [
        (
            torch.randn(size, 3, 32, 32, device=device, generator=generator),
            torch.randint(0, 10, (size,), device=device, generator=generator),
        )
        for _ in range(count)
    ]


def cuda_batches(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return random_batches(count, size, torch.device("cuda"))


def trained_by(
    kind: type[TrainStep | GraphedTrainStep], batches: list, amp: str, dropout: float, wrap=None
) -> tuple[dict, EpochStats]:
    """A fresh SmallCNN (seed 0) trained by ``kind`` for one epoch on ``batches``, on their
    device (``wrap`` around the model, if given): (final weights, epoch stats)."""
    device = batches[0][0].device
    runtime = Runtime(device, choose_precision(amp, device), torch.channels_last)
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, width=8, dropout=dropout, head_dropout=dropout)
    model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, SGDConfig(lr=0.1))
    schedule = build_schedule(optimizer, CosineConfig(interval="step"), 1, len(batches))
    step = TrainStep(
        model if wrap is None else wrap(model),
        nn.CrossEntropyLoss(),
        optimizer,
        torch.amp.GradScaler(device.type, enabled=False),
        ClippingConfig("norm", max_norm=1.0),
        runtime,
    )
    if kind is GraphedTrainStep:
        step = GraphedTrainStep(step)
    stats, _ = train_one_epoch(EpochLoop(step, batches, schedule), EpochSettings(100), 0)
    assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
    return model.state_dict(), stats


def train_eagerly_and_captured(batches: list, amp: str, dropout: float, wrap=None) -> dict:
    """The same model, seed and batches trained by TrainStep and by GraphedTrainStep
    (``wrap`` around the model, if given): each kind's (final weights, epoch stats)."""
    trained = {
        kind: trained_by(kind, batches, amp, dropout, wrap)
        for kind in (TrainStep, GraphedTrainStep)
    }
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
    done = run_cli([*ON_CUDA, *GRAPHED, "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "captured in a CUDA graph" in done.stdout and "training eagerly" not in done.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_acc"] > 30


class FailsItsWarmUp(nn.Module):
    """A model whose second forward pass off the default stream raises before it runs: a
    CUDA graph's warm-up fails after one whole step (dropout's masks drawn, its update
    vetoed); eager steps, on the default stream, train."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.off_default_stream = 0  # forward passes so far

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = images.device
        if torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
            self.off_default_stream += 1
            if self.off_default_stream == 2:
                raise RuntimeError("this model fails at its second step off the default stream")
        return self.model(images)


def test_a_warm_up_that_raises_puts_the_generator_back(caplog):
    """A capture whose warm-up raises at its second step (the first drew dropout masks):
    one warning, and the CUDA generator at the state it had before the warm-up, so the
    eager steps that follow draw the masks an eager run draws and the weights equal
    eager training's."""
    train_eagerly_and_captured(cuda_batches(4, 16), "bf16", dropout=0.2, wrap=FailsItsWarmUp)
    warnings = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "off the default stream" in warnings[0], warnings


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


def global_batchnorm_pair(device: torch.device) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A SmallCNN, the same converted to GlobalBatchNorm (model.sync_batchnorm=true), and
    a batch for them, in channels_last on ``device``."""
    torch.manual_seed(0)
    plain = SmallCNN(in_channels=3, width=8, dropout=0.0, head_dropout=0.0)
    plain.to(device, memory_format=torch.channels_last)
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, width=8, dropout=0.0, head_dropout=0.0)
    model = GlobalBatchNorm.convert(model.to(device, memory_format=torch.channels_last))
    images = torch.randn(32, 3, 32, 32, device=device)
    return plain, model, images.contiguous(memory_format=torch.channels_last)


def test_global_batchnorm_never_makes_the_host_wait(monkeypatch: pytest.MonkeyPatch):
    """model.sync_batchnorm=true's layer on the GPU: forward and backward through its
    global path (a one-process NCCL group, told it has two members so that the global
    path runs) raise nothing under torch.cuda.set_sync_debug_mode("error"); torch's
    own SyncBatchNorm syncs three times per layer there."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", 0),
    )
    try:
        plain, model, images = global_batchnorm_pair(torch.device("cuda", 0))
        monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
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


def evaluation_checkpoint(folder: Path) -> Path:
    """best.pt of an untrained SmallCNN for TINY's synthetic data (2048 training images),
    as far as stable-cnn-eval reads one."""
    overrides = [*TINY, "data.num_train=2048"]
    run = compose_run(overrides)
    info = DatasetInfo("synthetic", 1, 10, 28, tuple(f"class_{k}" for k in range(10)))
    spec = model_config(run, info)
    path = folder / "best.pt"
    config = OmegaConf.to_container(compose_config(overrides), resolve=True)
    save_checkpoint(
        {"model": build_model(spec).state_dict(), "model_config": spec, "config": config}, path
    )
    return path


def check_evaluation_on(device_name: str, path: Path) -> None:
    """Testing a checkpoint needs its test split on the device, not the training split;
    the training accuracy is a percentage."""
    loaded = load_for_evaluation(path, None, device_name)
    assert loaded.splits.test.images.device.type == torch.device(device_name).type
    assert loaded.splits.train.images.device.type == "cpu"
    assert 0 <= training_accuracy(path, count=512, device_name=device_name) <= 100


def test_stable_cnn_eval_keeps_the_training_images_off_the_gpu(tmp_path: Path):
    check_evaluation_on("cuda", evaluation_checkpoint(tmp_path))


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_an_image_folder_run_on_cuda(cache: str, tmp_path: Path):
    """The classic DataLoader path on a GPU (pinned batches, persistent workers), and
    batches read from a cache file on the host, copied to the GPU and augmented there
    (the figures' preview too, at the last epoch)."""
    from tests.test_data import write_image_folder

    write_image_folder(
        tmp_path / "images", {"train": {"cat": 40, "dog": 40}, "val": {"cat": 10, "dog": 10}}
    )
    done = run_cli(
        [
            *image_folder_run(tmp_path / "images", "cuda"),
            f"data.cache={cache}",
            "hydra.run.dir=run",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if cache == "none":
        assert "2 loader workers" in done.stdout
    else:
        assert "data.cache=disk: 80 images of train/ decoded into" in done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 2
