"""What the studies share: a grid of recipe variants x learning rates x seeds trained as
one resumable ``stable-cnn-train -m`` sweep, its runs read back per configuration, the
statistics that judge one variant against another, and the machine a report names."""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from stable_cnn.studies.report import RunRecord
from stable_cnn.system.hardware import describe_cpu, resolve_device, usable_cores

COLLAPSED_BELOW = 20.0  # test accuracy (%) under twice chance for 10 classes: it learned nothing


class SeedOutcomes:
    """The seeds of one configuration, read back (``runs``): shared by the ablation's rows
    and the stability map's points."""

    runs: list[RunRecord]

    def accuracies(self) -> list[float]:
        return [r.results["test_acc"] for r in self.runs if r.status == "finished"]

    @property
    def diverged(self) -> int:
        return sum(r.status == "diverged" for r in self.runs)

    @property
    def collapsed(self) -> int:
        """Finished runs that learned next to nothing: test accuracy under twice chance."""
        return sum(accuracy < COLLAPSED_BELOW for accuracy in self.accuracies())


def run_variant_sweep(
    out: Path,
    base: list[str],
    names: list[str],
    learning_rates: list[float],
    seeds: int,
    log_name: str,
) -> int:
    """Every variant x learning rate x seed as one sweep with trainer.resume=auto (a rerun
    skips what is done), its output appended to ``out/log_name``; returns its exit status
    (a diverged run is not an error, a failed one is: its row then shows fewer runs).
    The ablation and the stability map both run this way."""
    command = [
        sys.executable,
        "-m",
        "stable_cnn.cli.train",
        "-m",
        *base,
        "ablation=" + ",".join(names),
        "optimizer.lr=" + ",".join(str(lr) for lr in learning_rates),
        f"trainer.seed=range({seeds})",
        "trainer.resume=auto",
        "trainer.progress_bar=false",
        f"hydra.sweep.dir={out}",
    ]
    out.mkdir(parents=True, exist_ok=True)
    with (out / log_name).open("a") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def run_finder_sweep(out: Path, base: list[str], names: list[str], log_name: str) -> int:
    """``stable-cnn-lr-find`` for every variant at the study's settings, as one sweep into
    ``out``, its output appended to ``log_name`` beside it; returns its exit status."""
    command = [
        sys.executable,
        "-m",
        "stable_cnn.cli.lr_find",
        "-m",
        *base,
        "ablation=" + ",".join(names),
        "trainer.progress_bar=false",
        f"hydra.sweep.dir={out}",
    ]
    out.mkdir(parents=True, exist_ok=True)
    with (out.parent / log_name).open("a") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def describe_machine(device: str) -> str:
    where = resolve_device(device)
    if where.type == "cuda":
        return f"{torch.cuda.get_device_name(where)}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    cores = usable_cores()
    model = names[0] if names else "CPU"
    return f"{model} ({describe_cpu()}), {cores} cores, torch {torch.__version__} on the CPU"


def standard_error(a: list[float], b: list[float]) -> float:
    """Standard error of the difference of two means (Welch), at least 0.05 points."""
    return max((spread(a) ** 2 / len(a) + spread(b) ** 2 / len(b)) ** 0.5, 0.05)


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def write_study_report(
    report: Path, markdown: str, plot: Callable[[Path], bool], caption: str
) -> list[Path]:
    """The study's markdown report and, where the plot could be drawn, its PNG beside it
    (linked at the end of the report); returns what was written."""
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown)
    png = report.with_suffix(".png")
    if not plot(png):
        return [report]
    with report.open("a") as out:
        out.write(f"\n![{caption}]({png.name})\n")
    return [report, png]
