"""What the diagnostics show while training, and the evaluation command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from stable_cnn.config import ClippingConfig
from stable_cnn.system.hardware import FP32, Runtime
from stable_cnn.training.epoch import EpochLoop, EpochSettings, train_one_epoch
from stable_cnn.training.schedulers import build_schedule
from stable_cnn.training.step import TrainStep
from tests.conftest import TINY, compose_run, read_jsonl, run_cli
from tests.test_cli import scalar_tags
from tests.test_resume import TIMING

DIAGNOSED = [*TINY, "trainer.log_every_n_steps=1", "trainer.progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("clipping", ["norm", "none"])
def test_gradient_norms_before_and_after_clipping_are_logged(tmp_path: Path, clipping: str):
    run_dir = tmp_path / "run"
    done = run_cli(
        [
            *DIAGNOSED,
            f"clipping={clipping}",
            "clipping.max_norm=0.5" if clipping == "norm" else "trainer.epochs=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    tags = scalar_tags(run_dir)
    before, after = tags["stability/grad_norm"], tags["stability/grad_norm_clipped"]
    assert len(before) == len(after) > 10
    fractions = tags.get("stability/clipped_fraction", [])
    assert all(0.0 <= f <= 1.0 for f in fractions)
    epochs = read_jsonl(run_dir / "metrics.jsonl")
    if clipping == "norm":
        assert max(after) <= 0.5
        clipped = sum(b > 0.5 for b in before) / len(before)
        assert clipped > 0, "the test needs steps that get clipped"
        assert sum(e["clip_fraction"] for e in epochs) / len(epochs) == pytest.approx(
            clipped, abs=1e-6
        )
        assert "clipped" in done.stderr + done.stdout, "the console line shows the clip rate"
    else:
        assert before == after
        assert not fractions, "zero by construction: no chart (metrics.jsonl has the zeros)"
        assert all(e["grad_norm"] == e["grad_norm_clipped"] for e in epochs)


@pytest.fixture(scope="module")
def with_and_without_figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same deterministic run twice: without the figures and with them every epoch."""
    folder = tmp_path_factory.mktemp("figures")
    runs = {}
    for every in ("null", "1"):
        runs[every] = folder / f"figures-{every}"
        done = run_cli(
            [
                *DIAGNOSED,
                "trainer.deterministic=true",
                f"diagnostics.figures_every_n_epochs={every}",
                f"hydra.run.dir={runs[every]}",
            ],
            cwd=folder,
        )
        assert done.returncode == 0, done.stderr
    return runs


@pytest.mark.slow
def test_per_epoch_health_and_figures_in_tensorboard(with_and_without_figures: dict[str, Path]):
    run_dir = with_and_without_figures["1"]
    tags = scalar_tags(run_dir)
    for stage in ("stage1", "stage2", "stage3", "classifier"):
        assert all(v > 0 for v in tags[f"weights/norm_{stage}"])
    for stage in ("stage1", "stage2", "stage3"):
        low, high = (
            tags[f"weights/batchnorm_{stage}_running_var_min"],
            tags[f"weights/batchnorm_{stage}_running_var_max"],
        )
        assert all(0 < lo <= hi for lo, hi in zip(low, high))
    assert all(v > 0 for v in tags.get("stability/loss_spikes", [])[:1]), "from its first spike"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    histograms = set(events.Tags()["histograms"])
    wanted = {"weights/stage1", "weights/stage1_gradient", "weights/classifier_gradient"}
    assert wanted <= histograms
    images = {"samples/augmented_train_images", "predictions/confusion_matrix_val"}
    assert set(events.Tags()["images"]) == images
    grid = events.Images("samples/augmented_train_images")[0]
    assert grid.width >= 8 * 28 and grid.height >= 8 * 28  # an 8 x 8 grid of 28x28 images


@pytest.mark.slow
def test_figures_do_not_change_the_run(with_and_without_figures: dict[str, Path]):
    """The gradient snapshot forks the RNG and restores BatchNorm: same numbers either way."""
    runs = {
        every: [
            {k: v for k, v in e.items() if k not in TIMING}
            for e in read_jsonl(run_dir / "metrics.jsonl")
        ]
        for every, run_dir in with_and_without_figures.items()
    }
    assert runs["null"] == runs["1"]


def test_a_loss_spike_is_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    images, labels = torch.randn(40, 8, 16), torch.randint(0, 4, (40, 8))
    images[30] *= 300  # one batch whose loss jumps far above the running mean
    batches = list(zip(images, labels))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    schedule = build_schedule(optimizer, compose_run(TINY).scheduler, 1, len(batches))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    runtime = Runtime(torch.device("cpu"), FP32, torch.contiguous_format)
    train_step = TrainStep(
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        scaler,
        ClippingConfig("none"),
        runtime,
        loss_spike_factor=2.0,
    )
    stats, _ = train_one_epoch(EpochLoop(train_step, batches, schedule), EpochSettings(100), 0)
    assert stats.loss_spikes == 1
    assert stats.clip_fraction == 0.0


@pytest.mark.slow
def test_eval_command_reproduces_the_runs_test_accuracy(
    with_and_without_figures: dict[str, Path], tmp_path: Path
):
    run_dir = with_and_without_figures["null"]
    results = json.loads((run_dir / "results.json").read_text())
    evaluate = str(Path(sys.executable).parent / "stable-cnn-eval")
    out_dir = tmp_path / "eval"
    done = subprocess.run(
        [evaluate, f"checkpoint={run_dir}", f"out={out_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out_dir / "eval.json").read_text())
    assert report["test_acc"] == results["test_acc"], "the same images, model and precision"
    assert report["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)
    assert len(report["per_class_acc"]) == 10 and len(report["confusion"]) == 10
    assert sum(map(sum, report["confusion"])) == report["images"]
    assert "per class:" in done.stderr + done.stdout
    import matplotlib.image

    assert matplotlib.image.imread(out_dir / "confusion.png").shape[0] > 100

    wrong = subprocess.run(
        [
            evaluate,
            f"checkpoint={run_dir}",
            "data=synthetic",
            "data.num_classes=5",
            f"out={tmp_path / 'wrong'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode == 2
    (line,) = [line for line in (wrong.stdout + wrong.stderr).splitlines() if "error:" in line]
    assert (
        "trained on 1-channel images with 10 classes; data=synthetic has 1 channels and 5 "
        "classes: evaluate it on data of the same kind" in line
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"], "nothing else left"


@pytest.mark.slow
def test_ablation_driver_writes_a_row_per_variant_and_setting(tmp_path: Path):
    from stable_cnn.studies.ablation import VARIANTS

    report = tmp_path / "docs" / "ablation.md"
    ablate = str(Path(sys.executable).parent / "stable-cnn-ablate")
    done = subprocess.run(
        [
            ablate,
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "runs"),
            "--report",
            str(report),
            "--device",
            "cpu",
            "data=synthetic",
            "model.width=8",
            "trainer.epochs=1",
            "data.limit_train=null",
            "diagnostics.figures_every_n_epochs=null",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ")][1:]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    assert [(c[0], c[1]) for c in cells] == [
        (name, setting) for setting in ("normal", "stress") for name in VARIANTS
    ]
    for variant, _, accuracy, gap, diverged, collapsed, clip, evidence in cells:
        assert accuracy != "-" and diverged.endswith("/1") and collapsed.endswith("/1")
        assert evidence
        assert gap[0] in "+-", "train accuracy (eval mode) minus validation accuracy"
        assert clip == "0%" if variant == "no_clipping" else clip.endswith("%")
    assert "stable-cnn-ablate --seeds 1" in report.read_text()
    import matplotlib.image

    assert matplotlib.image.imread(report.with_suffix(".png")).shape[1] > 100


def test_macro_f1_and_per_class_accuracy_from_the_confusion_matrix():
    """Rows are true classes, columns predicted: class 0 has 3 right, 1 taken for class 1
    and 2 of class 1 taken for it (F1 6/9); class 1 has 4 right (F1 8/11)."""
    from stable_cnn.training.evaluation import EvalStats

    stats = EvalStats(0.5, 70.0, 10, torch.tensor([[3, 1], [2, 4]]))
    assert stats.macro_f1 == pytest.approx(100 * (6 / 9 + 8 / 11) / 2)
    assert stats.per_class == pytest.approx([75.0, 100 * 4 / 6])
    assert stats.summary("val", ("cat", "dog")) == {
        "val_f1": pytest.approx(69.70, abs=0.01),
        "val_per_class_acc": {"cat": 75.0, "dog": pytest.approx(66.67, abs=0.01)},
    }, "no top-5 with 2 classes"
    # a third class neither in the split nor predicted: no F1 of its own, no accuracy
    absent = EvalStats(0.5, 70.0, 10, torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]]))
    assert absent.macro_f1 == pytest.approx(stats.macro_f1)
    assert absent.per_class[2] is None
    from stable_cnn.training.evaluation import describe

    table = describe(
        {
            "data": "fashion_mnist",
            "test_acc": 70.0,
            "images": 10,
            "test_loss": 0.5,
            "precision": "fp32",
            "weights": "raw",
            "per_class_acc": dict(zip(("cat", "dog", "eel"), absent.per_class, strict=True)),
        }
    )
    assert "eel     n/a (no image)" in table, "stable-cnn-eval's table of a split without eels"
