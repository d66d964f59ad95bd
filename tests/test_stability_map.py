"""stable-cnn-map: the stable-range rule on made-up results, and the driver at tiny size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stable_cnn.studies.report import RunRecord
from stable_cnn.studies.stability_map import (
    LEARNING_RATES,
    Point,
    Variant,
    decades,
    evidence,
    judge_suggestion,
    stable_range,
)

LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def point(lr: float, *outcomes: float | str) -> Point:
    """A learning rate's seeds: a float is a finished run's test accuracy, "d" diverged."""
    runs = [
        RunRecord(Path("."), [], "diverged")
        if outcome == "d"
        else RunRecord(Path("."), [], "finished", results={"test_acc": float(outcome)})
        for outcome in outcomes
    ]
    return Point(lr, runs)


def points(*rows: tuple) -> list[Point]:
    return [point(lr, *outcomes) for lr, outcomes in zip(LRS, rows)]


def test_the_stable_range_is_the_plateau_around_the_best():
    grid = points(
        (60, 61, 59),
        (80, 81, 80),
        (88, 89, 88),
        (90, 91, 90),
        (89, 90, 89),
        (88, 88.5, 89),
        (40, 60, 10),
        ("d", "d", "d"),
    )
    assert stable_range(grid) == (0.03, 1.0)  # within 3 points of 90.3, none lost
    assert decades(stable_range(grid)) == pytest.approx(1.52, abs=0.01)


def test_one_collapsed_or_diverged_seed_breaks_the_range():
    grid = points(
        (88, 88, 88),
        (90, 90, 90),
        (90, 90, "d"),
        (90, 15, 90),
        (89, 89, 89),
        (10, 10, 10),
        (10, 10, 10),
        (10, 10, 10),
    )
    assert stable_range(grid) == (0.003, 0.01), "0.03 lost a seed; 0.3 is cut off from the best"


def test_two_stable_stretches_keep_the_one_with_the_best_accuracy():
    grid = points(
        (89, 89, 89),
        (88, 88, 88),
        (70, 70, 70),
        (90, 91, 90),
        (90, 90, 90),
        (60, 60, 60),
        (10, 10, 10),
        (10, 10, 10),
    )
    assert stable_range(grid) == (0.1, 0.3)


def test_a_single_stable_point_is_a_range_of_zero_decades():
    grid = points(
        (30, 30, 30), (50, 50, 50), (91, 92, 91), (60, 60, 60), ("d",), ("d",), ("d",), ("d",)
    )
    assert stable_range(grid) == (0.03, 0.03) and decades(stable_range(grid)) == 0.0


def test_when_everything_collapses_or_diverges_there_is_no_range():
    assert stable_range(points(*[(10, 12, 11)] * 4, *[("d", "d", "d")] * 4)) is None
    assert stable_range([point(lr) for lr in LRS]) is None, "no runs at all"


def test_evidence_names_the_range_and_the_learning_rates_where_it_differs():
    full = Variant("full", "", points(*[(90, 90.5, 90.2)] * 6, (60, 61, 62), ("d", "d", "d")))
    fragile = Variant(
        "no_x", "", points(*[(90, 90.5, 90.2)] * 3, *[(10, 11, 10)] * 4, (12, 13, 14))
    )
    sentence = evidence(fragile, full)
    assert "Stable 0.003 to 0.03" in sentence and "narrower by 1.5 decades" in sentence
    assert "worse beyond two standard errors at lr 0.1, 0.3, 1, 3" in sentence
    assert "better at lr 10" in sentence, "its chance-level runs beat three diverged ones"
    assert evidence(full, full).startswith("The reference: stable 0.003 to 1 (2.5 decades)")


@pytest.mark.slow
def test_map_driver_writes_every_variant_and_learning_rate(tmp_path: Path):
    report = tmp_path / "docs" / "stability_map.md"
    driver = str(Path(sys.executable).parent / "stable-cnn-map")
    done = subprocess.run(
        [
            driver,
            "--seeds",
            "1",
            "--lrs",
            "0.01,0.1",
            "--variants",
            "full,no_batchnorm",
            "--out",
            str(tmp_path / "runs"),
            "--report",
            str(report),
            "--device",
            "cpu",
            "--lr-find",
            "data=synthetic",
            "model.width=8",
            "trainer.epochs=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    text = report.read_text()
    assert "stable-cnn-map --seeds 1" in text and "Wall time:" in text
    grid = text.split("## Every learning rate")[1]
    header = next(line for line in grid.splitlines() if line.startswith("| variant"))
    assert header == "| variant | 0.01 | 0.1 |"
    rows = [
        line
        for line in grid.splitlines()
        if line.startswith("| full") or line.startswith("| no_batchnorm")
    ]
    assert len(rows) == 2 and all(line.count("|") == 4 and " - " not in line for line in rows)
    for name in ("full", "no_batchnorm"):
        assert f"- **{name}**" in text, "a headline sentence per variant"
    assert "The learning-rate finder's suggestion" in text and "of 2 variants" in text
    table = text.split("## Per variant")[1].split("## Every")[0]
    rows = [
        line.split(" | ")
        for line in table.splitlines()
        if line.startswith("| full") or line.startswith("| no_batchnorm")
    ]
    assert all(
        float(row[-2]) > 0 and row[-1].rstrip(" |") in ("inside", "in its cells", "outside")
        for row in rows
    ), table
    import matplotlib.image

    assert matplotlib.image.imread(report.with_suffix(".png")).shape[1] > 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variants", "full,foo"], "--variants foo: not a variant"),
        (["--variants", "no_amp"], "--variants must include full"),
        (["--lrs", "0.1,abc"], "--lrs 0.1,abc: give positive numbers"),
    ],
)
def test_bad_arguments_stop_in_one_line_before_any_run(args, message, tmp_path, capsys):
    from stable_cnn.cli.map import cli

    with pytest.raises(SystemExit) as stopped:
        cli([*args, "--out", str(tmp_path / "runs")])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_finders_suggestion_is_judged_by_the_grids_cells():
    """Inside the stable range, nearer (in log) to a stable grid point than to an unstable
    one, or outside: the verdicts of docs/stability_map.md's finder column."""

    grid = list(LEARNING_RATES)
    assert judge_suggestion(0.145, (0.1, 1.0), grid) == "inside"
    assert judge_suggestion(0.115, (0.1, 0.1), grid) == "in its cells"  # below sqrt(0.03)
    assert judge_suggestion(0.409, (0.1, 0.3), grid) == "in its cells"  # below sqrt(0.3)
    assert judge_suggestion(0.156, (0.3, 0.3), grid) == "outside"  # below sqrt(0.03)
    assert judge_suggestion(0.6, (0.1, 0.3), grid) == "outside"
    assert judge_suggestion(0.2, None, grid) == "outside"
