"""The CUDA path up to its first kernel, on this CPU: torch.cuda's API boundary reports
GPUs that are not there (tests/fake_gpu.py fakes is_available, device_count,
get_device_capability, get_device_name, current_device, set_device and the CUDA
random-state calls, nothing else), so that device choice, precision, TF32, seeding,
the random state a checkpoint keeps, resume's device checks and the data loaders'
GPU settings are checked on every CI run, not first on a lent GPU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stable_cnn.data.build import build_splits
from stable_cnn.errors import ConfigError
from stable_cnn.state.checkpoint import save_checkpoint
from stable_cnn.state.resume import locate_run, restore_rng, rng_state
from stable_cnn.system.distributed import World, device_for
from stable_cnn.system.hardware import FP32, Runtime, resolve_device
from stable_cnn.system.seeding import seed_everything, stream_seed
from stable_cnn.training.build import choose_runtime
from tests.conftest import REPO, TINY, compose_run
from tests.fake_gpu import A100, H100, V100
from tests.test_data import write_image_folder


def test_auto_and_cuda_mean_the_current_gpu_with_its_index(fake_gpu):
    """torch.cuda.set_device and DDP's device_ids refuse a CUDA device without an index:
    the default trainer.device=auto crashed at start-up on every GPU machine."""
    fake_gpu.count = 2
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    fake_gpu.current = 1  # e.g. CUDA_VISIBLE_DEVICES order, or a set_device before us
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize(
    ("gpu", "amp", "precision", "scaler", "why"),
    [
        (H100, "auto", "bf16", False, "amp=auto, GPU compute capability 9.0 has native bf16"),
        (A100, "auto", "bf16", False, "amp=auto, GPU compute capability 8.0 has native bf16"),
        (V100, "auto", "fp16", True, "amp=auto, GPU compute capability 7.0 lacks fast bf16"),
        (H100, "fp16", "fp16", True, "amp=fp16"),
    ],
)
def test_the_runtime_a_gpu_gets(fake_gpu, caplog, gpu, amp, precision, scaler, why):
    fake_gpu.name, fake_gpu.capability = gpu
    caplog.set_level(logging.INFO, logger="stable_cnn")
    runtime = choose_runtime(compose_run([*TINY, "trainer.device=auto", f"amp={amp}"]))
    assert runtime.device == torch.device("cuda", 0) and fake_gpu.set_device_calls == [0]
    assert (runtime.precision.name, runtime.precision.use_grad_scaler) == (precision, scaler)
    assert runtime.channels_last, "channels_last is the layout CUDA convolutions want"
    assert f"precision {precision} ({why}), channels_last layout" in caplog.text
    assert f"device cuda:0 ({gpu[0]})" in caplog.text


@pytest.mark.parametrize(("gpu", "tf32"), [(A100, True), (H100, True), (V100, False)])
def test_fp32_uses_tf32_from_ampere_on_unless_turned_off(fake_gpu, caplog, gpu, tf32):
    fake_gpu.name, fake_gpu.capability = gpu
    caplog.set_level(logging.INFO, logger="stable_cnn")
    choose_runtime(compose_run([*TINY, "trainer.device=cuda", "amp=off"]))
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert ("in TF32 (trainer.tf32=false for full fp32)" in caplog.text) is tf32
    choose_runtime(compose_run([*TINY, "trainer.device=cuda", "amp=off", "trainer.tf32=false"]))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_seeding_reaches_every_gpu_and_autotuning_follows_determinism(fake_gpu, monkeypatch):
    fake_gpu.count = 2
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(3, deterministic=False)
    assert fake_gpu.seeds == {0: stream_seed(3, "model"), 1: stream_seed(3, "model")}
    assert torch.backends.cudnn.benchmark, "cuDNN picks the fastest kernels"
    seed_everything(3, deterministic=True)
    assert not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    torch.use_deterministic_algorithms(False)


def test_a_checkpoint_keeps_and_restores_its_own_gpus_random_state(fake_gpu):
    """rng_state keeps the run's GPU's generator (the fake's state bytes are its seed's
    low byte, then its index), not the current GPU's nor every GPU's; restore_rng gives
    it back to that GPU alone, also from stable-cnn 0.1's list of every GPU's states.
    A CPU run keeps and restores no CUDA state on a machine with GPUs."""
    fake_gpu.count = 2
    fake_gpu.seeds = {0: 11, 1: 22}
    saved = rng_state(torch.device("cuda", 1))
    assert saved["cuda"][:2].tolist() == [22, 1], "cuda:1's generator, while cuda:0 is current"
    fake_gpu.seeds = {0: 33, 1: 44}  # the run went on drawing
    restore_rng(saved, torch.device("cuda", 1))
    assert list(fake_gpu.restored) == [1] and fake_gpu.restored[1][:2].tolist() == [22, 1]

    fake_gpu.restored.clear()
    states = [torch.full((16,), k, dtype=torch.uint8) for k in range(2)]
    restore_rng({**saved, "cuda": states}, torch.device("cuda", 1))
    assert list(fake_gpu.restored) == [1] and fake_gpu.restored[1][0] == 1, "its own entry"
    fake_gpu.restored.clear()
    restore_rng({**saved, "cuda": states[:1]}, torch.device("cuda", 1))
    assert fake_gpu.restored[1][0] == 0, "the first, where cuda:1 did not exist then"

    fake_gpu.restored.clear()
    on_cpu = rng_state(torch.device("cpu"))
    assert "cuda" not in on_cpu
    restore_rng(saved, torch.device("cpu"))
    assert fake_gpu.restored == {}, "a CPU run leaves the GPUs' generators alone"


def fake_gpu_checkpoint(run_dir: Path, config: dict, device_type: str, runtime: Runtime) -> None:
    """A resumable checkpoint as far as locate_run reads one (its run is unfinished)."""
    save_checkpoint(
        {
            "config": config,
            "model_config": {},
            "runtime": runtime.record(),
            "device_type": device_type,
            "world_size": 1,
        },
        run_dir / "checkpoints" / "last.pt",
    )


def test_resume_auto_passes_over_a_run_of_another_device_type(tmp_path, caplog):
    """A run written on a GPU, then trainer.resume=auto on a CPU machine (or the other
    way round): it used to be adopted and then refused ('written on cuda'); now it is
    not a candidate, and the log says why."""
    caplog.set_level(logging.INFO)
    config = {"trainer": {"seed": 0}}
    runtime = Runtime(torch.device("cpu"), FP32, torch.channels_last)
    fake_gpu_checkpoint(tmp_path / "outputs" / "gpu_run", config, "cuda", runtime)
    new_dir = tmp_path / "outputs" / "new"
    run_dir, resume_from, _ = locate_run("auto", new_dir, tmp_path / "outputs", config, runtime)
    assert (run_dir, resume_from) == (new_dir, None)
    assert "it trained on cuda, this run is on cpu" in caplog.text
    fake_gpu_checkpoint(tmp_path / "outputs" / "cpu_run", config, "cpu", runtime)
    _, resume_from, _ = locate_run("auto", new_dir, tmp_path / "outputs", config, runtime)
    assert resume_from == tmp_path / "outputs" / "cpu_run" / "checkpoints" / "last.pt"


def test_each_local_process_takes_the_gpu_of_its_local_rank(fake_gpu):
    fake_gpu.count = 2
    second = World(rank=1, size=2, local_rank=1, local_size=2, launcher="torchrun")
    assert device_for(second, "auto") == device_for(second, "cuda") == "cuda:1"
    slurm_task = World(rank=3, size=4, local_rank=1, local_size=2, launcher="slurm")
    fake_gpu.count = 1  # SLURM shows each task its own GPU only
    assert device_for(slurm_task, "auto") == "cuda:0"
    with pytest.raises(ConfigError, match="only 1 GPUs"):
        device_for(second, "auto")
    with pytest.raises(ConfigError, match="one GPU per process"):
        device_for(second, "cuda:0")


def test_image_folder_pins_batches_for_a_gpu_run_only_and_keeps_cuda_seeds(fake_gpu, tmp_path):
    """pin_memory follows the run's device, not whether CUDA exists; decoding with
    num_workers=0 seeds only the CPU generator (torch.manual_seed also reseeded every
    CUDA generator, so dropout masks on the GPU followed the last image's seed)."""
    write_image_folder(tmp_path, {"train": {"cat": 4, "dog": 4}, "val": {"cat": 1, "dog": 1}})
    run = compose_run(
        [
            "data=image_folder",
            "data.cache=none",  # the DataLoader path pins
            f"data.root={tmp_path}",
            "data.batch_size=4",
            "data.num_workers=0",
        ]
    )
    on_cpu = build_splits(run.data, torch.device("cpu"), seed=0)
    on_gpu = build_splits(run.data, torch.device("cuda", 0), seed=0)
    assert not on_cpu.train.loader.pin_memory and not on_cpu.test.pin_memory
    assert on_gpu.train.loader.pin_memory and on_gpu.test.pin_memory
    list(on_cpu.train)
    assert fake_gpu.seeds == {}, "no CUDA generator was reseeded"


@pytest.mark.slow
def test_the_default_command_on_a_gpu_machine_gets_to_its_first_cuda_tensor(
    fashion_mnist_root: Path, tmp_path: Path
):
    """`stable-cnn-train` with no device override, on a machine whose torch reports one
    H100: device choice, precision, TF32, seeding, the run folder and its lock all pass,
    and the run stops where this CPU machine must, at its first real CUDA tensor (the
    data moving to the GPU). It used to stop in torch.cuda.set_device with a traceback."""
    name, (major, minor) = H100
    script = (
        f"from tests.fake_gpu import run_cli_on_fake_gpu; run_cli_on_fake_gpu("
        f"1, {name!r}, {major}, {minor}, 'data.root={fashion_mnist_root}', "
        f"'hydra.run.dir=run', 'trainer.progress_bar=false')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "set_device" not in output and "Expected a torch.device" not in output, output
    assert "device cuda:0" in output
    assert "precision bf16 (amp=auto, GPU compute capability 9.0 has native bf16)" in output
    assert "data fashion_mnist" not in output, "it stopped while building the data"
    error = next(line for line in output.splitlines() if line.startswith("RuntimeError"))
    assert "NVIDIA driver" in error or "CUDA" in error, output[-2000:]
    assert "in build_splits" in output, "it stopped moving the data to the GPU"


def test_the_gradient_snapshot_puts_the_gpus_random_state_back(fake_gpu):
    """The figures' gradient snapshot runs a forward pass with dropout: on a GPU run it
    must fork and restore that GPU's generator (here the fake's state calls witness it;
    the model itself stays on the CPU, where autocast for CUDA does nothing)."""
    import warnings

    from stable_cnn.models.small_cnn import SmallCNN
    from stable_cnn.training.diagnostics import gradient_snapshot

    fake_gpu.count = 2
    model = SmallCNN(in_channels=1, width=4)
    runtime = Runtime(torch.device("cuda", 1), FP32, torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": autocast is off
        gradient_snapshot(
            model, torch.randn(4, 1, 16, 16), torch.arange(4), torch.nn.CrossEntropyLoss(), runtime
        )
    assert set(fake_gpu.restored) == {1}, "cuda:1's generator, and only its, put back"


def test_study_reports_name_the_gpu_they_ran_on(fake_gpu):
    """The machine line names the GPU the study runs on (the current one for auto), and
    the torch it ran; a CPU study names the CPU, not a GPU, on a machine with GPUs."""
    from stable_cnn.studies.sweep import describe_machine

    fake_gpu.count, fake_gpu.names = 2, (H100[0], A100[0])
    assert describe_machine("cuda:1") == f"{A100[0]}, torch {torch.__version__}"
    assert describe_machine("auto") == f"{H100[0]}, torch {torch.__version__}"
    fake_gpu.current = 1
    assert describe_machine("auto") == describe_machine("cuda") == describe_machine("cuda:1")
    assert describe_machine("cuda:0").startswith(f"{H100[0]}, ")
    on_cpu = describe_machine("cpu")
    assert on_cpu.endswith(f"torch {torch.__version__} on the CPU")
    assert A100[0] not in on_cpu and H100[0] not in on_cpu and "cores" in on_cpu
