"""Runs that survive: exact resume after kill -9 and SIGTERM, atomic checkpoints, and
clear errors for checkpoints that cannot be used."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stable_cnn.data.datasets import load_tensors
from stable_cnn.errors import EXIT_PREEMPTED
from stable_cnn.state.progress import SLOT
from tests.conftest import TINY, compose_run, read_jsonl, run_cli
from tests.test_cli import scalar_tags

pytestmark = pytest.mark.slow

# Long enough (about 45 steps an epoch) that a signal lands while the run is training.
RESUMABLE = [
    *TINY,
    "data.num_train=3000",
    "trainer.epochs=4",
    "trainer.deterministic=true",
    "trainer.progress_bar=false",
]
TIMING = {"train_img_s", "epoch_s"}


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "stable_cnn.train",
        *RESUMABLE,
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(
        command, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_epochs(run_dir: Path, epochs: int, process: subprocess.Popen) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("the run did not get far enough")


def stop_in_second_epoch(
    args: list[str], run_dir: Path, cwd: Path, env: dict[str, str] | None = None
) -> str:
    """Start a run in ``run_dir`` and SIGTERM it just after its first epoch is logged;
    returns what it printed (it must have exited as preempted)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "stable_cnn.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_epochs(run_dir, 1, process)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == EXIT_PREEMPTED, output
    return output


def outcome(run_dir: Path) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    metrics = [
        {k: v for k, v in e.items() if k not in TIMING}
        for e in read_jsonl(run_dir / "metrics.jsonl")
    ]
    results = json.loads((run_dir / "results.json").read_text())
    results = {k: v for k, v in results.items() if k != "wall_s"}
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    return metrics, results, weights


def assert_same_run(a: Path, b: Path) -> None:
    metrics_a, results_a, weights_a = outcome(a)
    metrics_b, results_b, weights_b = outcome(b)
    assert metrics_a == metrics_b
    assert results_a == results_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    done = start(run_dir)
    assert done.wait(timeout=300) == 0, done.stdout.read()
    return run_dir


def test_sigterm_then_kill_9_then_resume_gives_the_same_run(uninterrupted: Path, tmp_path: Path):
    """One run stopped twice, as a preempted job may be: SIGTERM in epoch 2 saves mid-epoch;
    the run resumed from that step is killed -9 in epoch 4 (in the middle of appending a
    metrics line); resumed again, with a store added, it ends as the run never stopped."""
    run_dir = tmp_path / "stopped"
    process = start(run_dir)
    wait_for_epochs(run_dir, 1, process)
    time.sleep(0.2)  # into epoch 2
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == EXIT_PREEMPTED, output
    assert "SIGTERM: stopped in epoch" in output and "trainer.resume=" in output
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"] is not None, "mid-epoch"
    assert state["progress"]["values"][SLOT["steps"]] > 0

    process = start(run_dir, f"trainer.resume={run_dir}")
    wait_for_epochs(run_dir, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert "(mid-epoch 2, step" in (run_dir / "train.log").read_text(), "from that step"
    assert not (run_dir / "results.json").exists()
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"epoch": 4, "global_st')  # a kill in the middle of appending a line

    resumed = start(run_dir, "trainer.resume=auto", "logger=csv")  # a store added on resume
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming from" in output
    assert_same_run(uninterrupted, run_dir)
    with (run_dir / "metrics.csv").open() as table:
        rows = list(csv.DictReader(table))
    epochs = read_jsonl(run_dir / "metrics.jsonl")
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4], "each epoch once"
    assert [float(row["val_acc"]) for row in rows] == [e["val_acc"] for e in epochs]
    first_class = next(iter(epochs[0]["val_per_class_acc"]))
    assert float(rows[0][f"val_per_class_acc/{first_class}"]) == pytest.approx(
        epochs[0]["val_per_class_acc"][first_class]
    )

    events = EventAccumulator(str(run_dir))
    events.Reload()
    steps = [e.step for e in events.Scalars("accuracy/val")]
    assert len(steps) == 4 and steps == sorted(set(steps)), "no epoch logged twice"
    steps = [e.step for e in events.Scalars("loss/train")]
    assert steps == sorted(set(steps)), "the interrupted tail is purged, not duplicated"
    assert scalar_tags(run_dir)["accuracy/val"] == [
        e["val_acc"] for e in read_jsonl(run_dir / "metrics.jsonl")
    ]


@pytest.fixture(scope="module")
def fashion_folder(fashion_mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST images as PNG files in class folders: 30 of each class to
    train on, 5 to validate on."""
    return write_fashion_folder(
        tmp_path_factory.mktemp("fashion_folder"), fashion_mnist_root, 30, 5
    )


def write_fashion_folder(root: Path, fashion_mnist_root: Path, train: int, val: int) -> Path:
    """The first ``train`` training images of each Fashion-MNIST class in root/train/<class>/
    as PNG files, and ``val`` test images of each in root/val/<class>/."""
    from PIL import Image

    data = compose_run([f"data.root={fashion_mnist_root}", "data.download=false"]).data
    for split, training, count in (("train", True, train), ("val", False, val)):
        images, labels, _ = load_tensors(data, train=training)
        for label in range(10):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for k, index in enumerate((labels == label).nonzero()[:count, 0].tolist()):
                Image.fromarray(images[index, 0].numpy()).save(folder / f"{k}.png")
    return root


def image_folder_run(fashion_folder: Path, cache: str, workers: int) -> list[str]:
    return [
        *(a for a in TINY if not a.startswith("data=")),
        "data=image_folder",
        f"data.cache={cache}",
        f"data.root={fashion_folder}",
        "data.in_channels=1",
        "data.mean=[0.286]",  # Fashion-MNIST's statistics
        "data.std=[0.353]",
        "data.image_size=28",
        "data.batch_size=4",
        f"data.num_workers={workers}",
        "model.head_dropout=0.1",
        "trainer.deterministic=true",
        "trainer.progress_bar=false",
    ]


@pytest.fixture(scope="module")
def whole_image_folder_runs(fashion_folder: Path, tmp_path_factory) -> dict[str, Path]:
    """The image folder's runs never stopped, one per cache (data.cache=none in the main
    process: a loader worker draws the same images and augmentations)."""
    folder = tmp_path_factory.mktemp("whole_image_folder")
    runs = {}
    for cache in ("memory", "disk", "none"):
        args = [*image_folder_run(fashion_folder, cache, 0), f"hydra.run.dir={folder / cache}"]
        done = run_cli(args, folder)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[cache] = folder / cache
    return runs


@pytest.mark.parametrize(
    ("cache", "workers"), [("memory", 0), ("disk", 0), ("none", 0), ("none", 1)]
)
def test_image_folder_with_dropout_resumes_exactly(
    cache: str, workers: int, fashion_folder: Path, whole_image_folder_runs, tmp_path: Path
):
    """SIGTERM in epoch 2, resume, same weights as the run never stopped: from the decoded
    images, and through DataLoader iterators, which a resumed process starts at other
    points of the run and which draw nothing from the dropout stream. Through one loader
    worker, the run is the one the main process draws."""
    args = image_folder_run(fashion_folder, cache, workers)
    stopped = tmp_path / "stopped"
    stop_in_second_epoch(args, stopped, tmp_path)
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"] is not None, "stopped mid-epoch"
    resumed = run_cli([*args, "trainer.resume=auto", f"hydra.run.dir={stopped}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "mid-epoch" in resumed.stdout
    assert_same_run(whole_image_folder_runs[cache], stopped)


def test_a_finished_run_is_not_trained_again(uninterrupted: Path):
    before = (uninterrupted / "results.json").read_text()
    done = run_cli(
        [*RESUMABLE, "trainer.resume=auto", f"hydra.run.dir={uninterrupted}"],
        cwd=uninterrupted.parent,
    )
    assert done.returncode == 0 and "already finished" in done.stdout
    assert (uninterrupted / "results.json").read_text() == before


def test_a_run_folder_is_never_reused_by_accident(uninterrupted: Path):
    done = run_cli([*RESUMABLE, f"hydra.run.dir={uninterrupted}"], cwd=uninterrupted.parent)
    assert done.returncode == 2
    assert "already holds a run" in done.stdout and "trainer.resume=auto" in done.stdout


def test_resuming_with_other_settings_is_refused(uninterrupted: Path, tmp_path: Path):
    checkpoint = uninterrupted / "checkpoints" / "last.pt"
    done = run_cli(
        [*RESUMABLE, "trainer.epochs=6", f"trainer.resume={checkpoint}", "hydra.run.dir=run"],
        tmp_path,
    )
    assert done.returncode == 2
    assert "trainer.epochs differ" in done.stdout and str(checkpoint) in done.stdout


@pytest.mark.parametrize(
    "damage", ["garbage", "truncated", "foreign", "missing", "other width", "older version"]
)
def test_unusable_checkpoints_are_one_line_errors(damage: str, uninterrupted: Path, tmp_path):
    path = tmp_path / "bad.pt"
    good = (uninterrupted / "checkpoints" / "last.pt").read_bytes()
    overrides = []
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif damage == "other width":
        path.write_bytes(good)
        overrides = ["model.width=16"]
    elif damage == "older version":
        state = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)
        torch.save({**state, "format": "stable-cnn/1"}, path)
    expected = {
        "garbage": "is corrupt",
        "truncated": "is corrupt",
        "foreign": "not a stable-cnn",
        "missing": "no checkpoint at",
        "other width": "model.width differ",
        "older version": "written by an older stable-cnn",
    }[damage]
    done = run_cli(
        [*RESUMABLE, *overrides, f"trainer.resume={path}", "hydra.run.dir=run"], tmp_path
    )
    errors = [line for line in done.stdout.splitlines() if "error:" in line]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(errors) == 1 and expected in errors[0] and str(path) in errors[0]
    assert "Traceback" not in done.stdout + done.stderr


SAVE_FOREVER = """
import sys, torch
from pathlib import Path
from stable_cnn.state.checkpoint import save_checkpoint
path, step = Path(sys.argv[1]), 0
big = torch.zeros(2_000_000)  # 8 MB: each save takes a while, so kills land mid-write
while True:
    step += 1
    save_checkpoint({"step": step, "weights": big + step}, path)
    print(step, flush=True)
"""


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path: Path):
    from stable_cnn.state.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    for attempt in range(5):
        writer = subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline()  # at least one save completed
        time.sleep(0.05 + 0.037 * attempt)  # land at different points of a write
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        state = load_checkpoint(path)
        assert torch.all(state["weights"] == state["step"]), "one save, whole and consistent"
    save_checkpoint({"step": 0, "weights": torch.zeros(1)}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"], "killed writers' files go"


FILL_THE_DISK = """
import resource, signal, sys, torch
from pathlib import Path
from stable_cnn.state.checkpoint import CheckpointError, save_checkpoint
path = Path(sys.argv[1])
save_checkpoint({"step": 1, "weights": torch.zeros(1000)}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # like a disk that fills up
try:
    save_checkpoint({"step": 2, "weights": torch.zeros(1_000_000)}, path)
except CheckpointError as err:
    print(err)
"""


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path: Path):
    from stable_cnn.state.checkpoint import load_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    done = subprocess.run(
        [sys.executable, "-c", FILL_THE_DISK, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "could not write checkpoint" in done.stdout and "previous checkpoint" in done.stdout
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"], "no partial file is left"


def test_an_output_folder_inside_a_file_is_one_line(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = run_cli([*TINY, f"hydra.run.dir={blocker / 'run'}"], tmp_path)
    assert done.returncode == 2
    assert "cannot create the run folder" in done.stderr and "is a file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_resume_at_another_precision_is_refused_and_can_be_forced(
    uninterrupted: Path, tmp_path: Path
):
    """amp=auto resolves per machine: a checkpoint from a machine that trained in another
    precision (bf16 there, fp32 here, or the other way round) is refused in one line
    that names both and the override that continues as the run started."""
    from stable_cnn.system.hardware import choose_precision

    here = choose_precision("auto", torch.device("cpu")).name
    there = "fp32" if here == "bf16" else "bf16"
    state = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)
    assert state["runtime"]["precision"] == here, "the checkpoint records what was resolved"
    state["runtime"]["precision"] = there  # as if written on the other kind of CPU
    checkpoints = tmp_path / "moved" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        torch.save(state, checkpoints / name)

    done = run_cli([*RESUMABLE, f"trainer.resume={checkpoints / 'last.pt'}"], tmp_path)
    errors = [line for line in done.stdout.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1, done.stdout + done.stderr
    forced = "amp=off" if there == "fp32" else "amp=bf16"
    assert f"trained in {there}" in errors[0] and f"continue in {here}" in errors[0]
    assert f"{forced} trainer.channels_last=" in errors[0]

    done = run_cli([*RESUMABLE, forced, f"trainer.resume={checkpoints / 'last.pt'}"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "moved" / "results.json").read_text())["precision"] == there
