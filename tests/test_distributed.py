"""Several processes (DDP over gloo, on the CPU): torchrun and trainer.devices=N write one
run, take the steps of one process with their global batch, evaluate exactly as one
process does, stop together and resume exactly."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from stable_cnn.cli.train import worker_arguments
from stable_cnn.data.splits import Shard
from stable_cnn.data.tensors import TensorBatches
from stable_cnn.errors import EXIT_FAILED, EXIT_PREEMPTED, ConfigError, UserError
from stable_cnn.state.checkpoint import save_checkpoint
from stable_cnn.state.record import CheckpointRecord
from stable_cnn.state.resume import check_same_config, find_checkpoint
from stable_cnn.state.run_lock import LOCK_FILE, RunLock
from stable_cnn.system.distributed import (
    ALONE,
    World,
    check_devices,
    device_for,
    tasks_per_node,
    threads_per_process,
    world_from_environment,
)
from tests.conftest import TINY, read_jsonl, run_cli
from tests.test_resume import assert_same_run, wait_for_epochs

# Two processes on the two cores, long enough (80 steps an epoch each, about a second) that a
# signal lands while they train.
TWO = [
    *TINY,
    "data.num_train=10240",
    "data.batch_size=64",
    "trainer.epochs=2",
    "trainer.deterministic=true",
    "trainer.progress_bar=false",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "stable_cnn.train",
        *TWO,
        "trainer.devices=2",
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(
        command, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker that the launcher started as ``rank``."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "uninterrupted"
    done = start(run_dir)
    output = done.communicate(timeout=300)[0]
    assert done.returncode == 0, output
    (run_dir.parent / "console.txt").write_text(output)
    return run_dir


@pytest.mark.slow
def test_two_processes_with_sync_batchnorm_step_like_one_with_twice_the_batch(tmp_path: Path):
    """The equivalence that proves the sharding, the gradient averaging and SyncBatchNorm:
    no dropout, no augmentation, the same seed; three steps. Also: torchrun with one
    process (the distributed path, as the GPU check takes it with NCCL) changes not a
    single number, and the figures' gradient snapshot, a collective under SyncBatchNorm,
    does not deadlock two processes.

    Float tolerance, measured: one process with 1 thread and with 2 differs by 2e-5 at
    most (summation order); 2 processes with SyncBatchNorm by 3e-5; 2 processes without
    it by 6e-4. A small learning rate and no clipping keep three steps from amplifying
    the rounding (at lr 0.1 with clipping, 1 vs 2 threads differ by 2e-4)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # trainer.num_threads=1: every process alike, torchrun's and the plain one's
    same = [
        *TINY,
        "trainer.epochs=1",
        "data.limit_train=384",
        "model.sync_batchnorm=true",
        "model.dropout=0",
        "model.head_dropout=0",
        "data.augment=false",
        "amp=off",
        "trainer.deterministic=true",
        "optimizer.lr=0.02",
        "clipping=none",
        "diagnostics.figures_every_n_epochs=1",
        "trainer.num_threads=1",
    ]
    two = run_cli([*same, "data.batch_size=64", "trainer.devices=2", "hydra.run.dir=two"], tmp_path)
    one = run_cli([*same, "data.batch_size=128", "hydra.run.dir=one"], tmp_path)
    launched = subprocess.run(
        [
            *TORCHRUN[:-1],
            "--nproc_per_node=1",
            "-m",
            "stable_cnn.train",
            *same,
            "data.batch_size=128",
            "hydra.run.dir=torchrun",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    for done in (two, one, launched):
        assert done.returncode == 0, done.stdout + done.stderr
    saved = {
        name: torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        for name in ("one", "two")
    }
    assert saved["one"]["counters"]["global_step"] == saved["two"]["counters"]["global_step"] == 3
    for key, value in saved["one"]["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(saved["two"]["model"][key], value, rtol=0, atol=1e-4)
    assert "batch 64 per process, 128 in all" in two.stdout

    assert "(one of 1 processes, gloo)" in launched.stdout + launched.stderr
    assert_same_run(tmp_path / "one", tmp_path / "torchrun")
    again = subprocess.run(
        [
            *TORCHRUN[:-1],
            "--nproc_per_node=1",
            "-m",
            "stable_cnn.train",
            *same,
            "data.batch_size=128",
            f"trainer.resume={tmp_path / 'torchrun'}",
            "hydra.run.dir=again",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already finished: nothing to resume" in again.stdout + again.stderr
    assert not (tmp_path / "again").exists(), "torchrun's command left no folder of its own"

    events = EventAccumulator(str(tmp_path / "two"))
    events.Reload()
    assert "weights/stage1_gradient" in events.Tags()["histograms"]
    assert "predictions/confusion_matrix_val" in events.Tags()["images"]


def test_each_process_takes_its_own_batches_and_as_many_as_the_others():
    images = torch.arange(1000, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    labels = torch.arange(1000)

    def batches(shard: Shard, train: bool) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(3) if train else None
        stream = TensorBatches(
            images.contiguous(),
            labels,
            64 if train else 300,
            torch.zeros(1),
            torch.ones(1),
            train=train,
            generator=generator,
            shard=shard,
        )
        return [batch_labels for _, batch_labels in stream]

    one = torch.cat(batches(Shard(0, 1), train=True))
    mine, theirs = batches(Shard(0, 2), True), batches(Shard(1, 2), True)
    assert len(mine) == len(theirs) == 7  # 15 batches of 64 in 1000 images: 7 each
    assert set(torch.cat(mine).tolist()).isdisjoint(torch.cat(theirs).tolist())
    interleaved = torch.cat([torch.cat(pair) for pair in zip(mine, theirs, strict=True)])
    assert torch.equal(interleaved, one[: len(interleaved)]), "one process's order, dealt out"
    evaluated = (
        batches(Shard(0, 3), False) + batches(Shard(1, 3), False) + batches(Shard(2, 3), False)
    )
    assert sorted(torch.cat(evaluated).tolist()) == list(range(1000)), "every image once"


def assert_one_run(root: Path, output: str, accuracy_above: float, epochs: int = 2) -> None:
    """One run folder under ``root``, one event file, one metrics row per epoch, one
    report; the lock gone; and a model that learned (chance is 10%)."""
    folders = [path.parent for path in root.rglob(".hydra")]
    assert len(folders) == 1, f"one run folder, not {folders}"
    run_dir = folders[0]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    rows = [record["epoch"] for record in read_jsonl(run_dir / "metrics.jsonl")]
    assert rows == list(range(1, epochs + 1))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["processes"] == 2 and results["test_acc"] > accuracy_above
    assert output.count("test of best checkpoint") == 1, "rank 0 reports"
    assert not (run_dir / LOCK_FILE).exists(), "the lock goes when the run ends"


@pytest.mark.slow
def test_trainer_devices_writes_one_run_with_one_writer(two_process_run: Path):
    output = (two_process_run.parent / "console.txt").read_text()
    assert_one_run(two_process_run.parent, output, accuracy_above=80)  # measured 93-97%


@pytest.mark.slow
@pytest.mark.parametrize("run_dir", [["hydra.run.dir=run"], []], ids=["run dir", "no run dir"])
def test_torchrun_writes_one_run_with_one_writer(run_dir: list[str], tmp_path: Path):
    """Without hydra.run.dir each process would name its own outputs/<date>/<time>; with
    logger=mlflow (where installed) only rank 0 opens a run."""
    mlflow = ["logger=mlflow", "logger.tracking_uri=sqlite:///outputs/mlflow.db"]
    if not run_dir or importlib.util.find_spec("mlflow") is None:
        mlflow = []
    few = [item for item in TWO if not item.startswith(("data.num_train=", "trainer.epochs="))]
    done = subprocess.run(
        [
            *TORCHRUN,
            "-m",
            "stable_cnn.train",
            *few,
            "data.num_train=2560",
            "trainer.epochs=3",
            *run_dir,
            *mlflow,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert_one_run(tmp_path, done.stdout + done.stderr, accuracy_above=40, epochs=3)  # 53%
    if mlflow:  # rank 0 alone logs: one MLflow run, one point per epoch
        from tests.test_trackers import store

        client = store(tmp_path)
        (run,) = client.search_runs([client.get_experiment_by_name("stable-cnn").experiment_id])
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "accuracy/val")) == 3


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process_on_the_same_checkpoint(
    two_process_run: Path, tmp_path: Path
):
    done = subprocess.run(
        [sys.executable, "-m", "stable_cnn.cli.eval", f"checkpoint={two_process_run}", "out=eval"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    alone = json.loads((tmp_path / "eval" / "eval.json").read_text())
    sharded = json.loads((two_process_run / "results.json").read_text())
    assert alone["test_acc"] == sharded["test_acc"]
    assert alone["test_loss"] == pytest.approx(sharded["test_loss"], rel=1e-5)


def interrupt(
    run_dir: Path, rank_signal: signal.Signals, after_epochs: int = 1
) -> subprocess.CompletedProcess:
    """Start a 2-process run and send ``rank_signal`` to rank 1 alone, early in the epoch
    after ``after_epochs``."""
    launcher = start(run_dir)
    wait_for_epochs(run_dir, after_epochs, launcher)
    time.sleep(0.3)  # past the checkpoint, into the next epoch
    os.kill(worker_of_rank(launcher, 1), rank_signal)  # rank 0 never sees it
    output = launcher.communicate(timeout=120)[0]
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, output)


def resume(run_dir: Path) -> str:
    """Continue ``run_dir`` from a command whose own folder would be another: the run goes
    on in its folder, and the command's folder is gone when it ends."""
    elsewhere = run_dir.parent / f"{run_dir.name}-resumer"
    resumed = start(elsewhere, f"trainer.resume={run_dir}")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert not elsewhere.exists(), "the command's own folder is not left behind"
    assert "resuming from" in (run_dir / "train.log").read_text(), "its log went on there"
    return output


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_the_resume_is_exact(
    two_process_run: Path, tmp_path: Path
):
    run_dir = tmp_path / "preempted"
    stopped = interrupt(run_dir, signal.SIGTERM)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stdout
    assert "SIGTERM (on rank 1): stopped in epoch 2" in stopped.stdout
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"] is not None, "mid-epoch"
    assert state["world_size"] == 2 and len(state["other_processes"]) == 1
    assert state["other_processes"][0]["data"]["position"] == state["data"]["position"]

    assert "mid-epoch 2" in resume(run_dir)
    assert_same_run(two_process_run, run_dir)


@pytest.mark.slow
def test_kill_9_of_one_process_ends_the_job_and_the_run_resumes(
    two_process_run: Path, tmp_path: Path
):
    run_dir = tmp_path / "killed"
    killed = interrupt(run_dir, signal.SIGKILL)
    assert killed.returncode not in (0, EXIT_PREEMPTED), killed.stdout
    assert not (run_dir / "results.json").exists()

    assert "resuming from" in resume(run_dir)
    assert_same_run(two_process_run, run_dir)


@pytest.mark.slow
def test_a_diverging_step_stops_both_processes_together(tmp_path: Path):
    """With trainer.on_nonfinite=stop the step's flags are read on every process; they are
    agreed, so both save (one checkpoint, both positions) and stop at the same step."""
    done = run_cli(
        [
            *TINY,
            "data.batch_size=64",
            "trainer.devices=2",
            "optimizer.lr=1e30",
            "clipping=none",
            "trainer.on_nonfinite=stop",
            "hydra.run.dir=run",
        ],
        tmp_path,
    )
    errors = [line for line in done.stdout.splitlines() if "error:" in line]
    assert done.returncode == EXIT_FAILED, done.stdout + done.stderr
    assert len(errors) == 1 and "non-finite loss at step" in errors[0]
    assert json.loads((tmp_path / "run" / "failure.json").read_text())["status"] == "diverged"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["other_processes"]) == 1


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_one_line(
    two_process_run: Path, tmp_path: Path
):
    checkpoint = two_process_run / "checkpoints" / "last.pt"
    done = run_cli([*TWO, f"trainer.resume={checkpoint}", "hydra.run.dir=run"], tmp_path)
    errors = [line for line in done.stdout.splitlines() if "error:" in line]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(errors) == 1 and "written by 2 process(es), this run has 1" in errors[0]
    assert "trainer.devices=2" in errors[0]


HOLD_LOCK = """
import sys, time
from pathlib import Path
from stable_cnn.state.run_lock import RunLock
RunLock().acquire_for(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_resume_auto_never_adopts_a_run_a_live_process_is_writing(tmp_path: Path):
    outputs = tmp_path / "outputs"
    folder = outputs / "unfinished"
    save_checkpoint({"config": {}, "model_config": {}}, folder / "checkpoints" / "last.pt")
    writer = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "locked"
        assert find_checkpoint("auto", tmp_path / "new", outputs, {}) is None
        with pytest.raises(UserError, match=f"being written by process {writer.pid}"):
            RunLock().acquire_for(folder)
    finally:
        writer.kill()  # as kill -9 would: no clean-up, the lock file stays
        writer.wait()
    assert (folder / LOCK_FILE).exists()
    # its writer is gone, so is its flock: the run is resumed
    assert find_checkpoint("auto", tmp_path / "new", outputs, {}) == folder / "checkpoints" / (
        "last.pt"
    )
    lock = RunLock().acquire_for(folder)
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_FILE).exists()


def test_the_world_comes_from_the_launchers_variables():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = world_from_environment(torchrun)
    assert (world.rank, world.size, world.local_rank, world.local_size) == (3, 8, 1, 2)
    assert world.distributed and not world.is_main and world.launcher == "torchrun"
    assert threads_per_process(world, cores=16) == 8, "two processes share this machine"
    assert world_from_environment({}) == ALONE and not ALONE.distributed
    # a SLURM batch script with 4 tasks is not itself one of them (no job step)
    assert world_from_environment({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == ALONE
    alone_under_torchrun = world_from_environment({"RANK": "0", "WORLD_SIZE": "1"})
    assert alone_under_torchrun.distributed, "torchrun with one process: the DDP path"


def test_a_slurm_step_of_several_tasks_is_a_world(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MASTER_ADDR", "node-a")  # else scontrol expands the node list
    monkeypatch.setenv("MASTER_PORT", "")
    del os.environ["MASTER_PORT"]  # monkeypatch puts the old value (or none) back
    step = {
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_ID": "1234",
    }
    world = world_from_environment(step)
    assert world == World(rank=5, size=8, local_rank=1, local_size=4, launcher="slurm")
    assert threads_per_process(world, cores=8) == 8, "SLURM gives each task its own cores"
    assert os.environ["MASTER_PORT"] == str(20000 + 1234)
    assert tasks_per_node("4(x2),3") == [4, 4, 3]


def test_trainer_devices_must_match_the_launchers_process_count():
    world = World(rank=0, size=4, local_rank=0, local_size=2, launcher="torchrun")
    check_devices(world, 1)
    check_devices(world, 2)
    with pytest.raises(ConfigError, match=r"trainer\.devices=3 but this machine runs 2 processes"):
        check_devices(world, 3)
    with pytest.raises(ConfigError, match="would put all 2 processes of this machine on one GPU"):
        device_for(world, "cuda:0")


def test_trainer_devices_workers_get_this_jobs_whole_command(tmp_path: Path):
    """Config name and folder, Hydra's own overrides and the task's, in this run's folder;
    not what belongs to the launching command (the sweep, its launcher)."""
    hydra_config = OmegaConf.create(
        {
            "job": {"config_name": "mine"},
            "runtime": {
                "config_sources": [
                    {"path": "/repo/conf", "schema": "file", "provider": "main"},
                    {"path": "/my/configs", "schema": "file", "provider": "command-line"},
                ]
            },
            "overrides": {
                "hydra": [
                    "hydra.mode=MULTIRUN",
                    "hydra/launcher=joblib",
                    "hydra.job.chdir=true",
                    "hydra.sweep.dir=sweeps/x",
                ],
                "task": ["trainer.devices=2", "optimizer.lr=0.2"],
            },
        }
    )
    arguments = worker_arguments(hydra_config, tmp_path / "run", threads=3)
    assert arguments == [
        "--config-name",
        "mine",
        "--config-dir",
        "/my/configs",
        "hydra.job.chdir=true",
        "trainer.devices=2",
        "optimizer.lr=0.2",
        f"hydra.run.dir='{tmp_path / 'run'}'",
        "trainer.num_threads=3",
    ]


def test_a_checkpoint_from_before_sync_batchnorm_existed_still_resumes():
    saved = {"model": {"width": 8, "depth": 2}, "trainer": {"epochs": 3}}
    now = {"model": {"width": 8, "depth": 2, "sync_batchnorm": False}, "trainer": {"epochs": 3}}
    old = CheckpointRecord({}, saved, (), None, None, None)
    check_same_config(old, now, Path("old.pt"))  # no error
    with pytest.raises(UserError, match=r"model\.sync_batchnorm differ"):
        check_same_config(
            old, {**now, "model": {**now["model"], "sync_batchnorm": True}}, Path("old.pt")
        )


REPEATED_SIGNAL = """
import os, signal, time
from stable_cnn.system.signals import GracefulStop
with GracefulStop() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # the same request again (slurmstepd, then torchrun)
    time.sleep(0.2)
    print("still running after", stop.signal_name, flush=True)
    time.sleep(2.5)
    os.kill(os.getpid(), signal.SIGTERM)  # a new request, later: stop at once
    time.sleep(10)
    print("not reached", flush=True)
"""


def test_a_signal_delivered_twice_is_one_request_and_a_later_one_stops_at_once():
    done = subprocess.run(
        [sys.executable, "-c", REPEATED_SIGNAL], capture_output=True, text=True, timeout=60
    )
    assert "still running after SIGTERM" in done.stdout
    assert "not reached" not in done.stdout and done.returncode == -signal.SIGTERM
