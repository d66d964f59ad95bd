"""The learning-rate range test: ``stable-cnn-lr-find`` on the default recipe suggests a
learning rate inside the full recipe's measured stable range and leaves its curve as
JSON, PNG and TensorBoard scalars in one folder; ``optimizer.lr=auto`` trains exactly as
the found value given by hand would, and a resumed run keeps the value it found."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stable_cnn.config.lr_find import LRFindConfig
from stable_cnn.errors import ConfigError
from stable_cnn.training.lr_finder import LRCurve, has_diverged, learning_rates, suggest
from tests.conftest import TINY, run_cli
from tests.test_export import command
from tests.test_resume import RESUMABLE, assert_same_run, stop_in_second_epoch

pytestmark = pytest.mark.slow


def test_the_default_recipe_gets_a_stable_learning_rate_and_its_curve(
    fashion_mnist_root: Path, tmp_path: Path
):
    """On real Fashion-MNIST at the stability map's size (10,000 training images), the
    suggestion falls inside the full recipe's stable range, 0.1 to 1 (docs/stability_map.md)."""
    done = command(
        "stable-cnn-lr-find",
        f"data.root={fashion_mnist_root}",
        "data.limit_train=10000",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (folder,) = (tmp_path / "outputs" / "lr_find").glob("*/*")
    said = [line for line in done.stdout.splitlines() if line.startswith("suggested optimizer.lr=")]
    assert len(said) == 1 and str(folder) in said[0], done.stdout

    found = json.loads((folder / "lr_find.json").read_text())
    assert 0.1 <= found["suggested_lr"] <= 1.0, found["suggested_lr"]
    assert found["suggested_lr"] < found["max_stable_lr"], "a margin below the edge"
    assert "minimum of the smoothed loss" in found["rule"]
    lrs = [point["lr"] for point in found["curve"]]
    assert lrs[0] == pytest.approx(1e-4) and lrs == sorted(lrs) and len(lrs) == found["steps"]
    assert found["stopped_at_divergence"] and lrs[-1] < 10, "it stops once the loss diverged"
    assert (folder / "lr_find.png").read_bytes()[:4] == b"\x89PNG"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    assert {"lr_find/loss", "lr_find/smoothed_loss", "lr_find/lr"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("lr_find/lr")) == found["steps"]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("events.")) == [
        ".hydra",
        "lr_find.json",
        "lr_find.log",
        "lr_find.png",
    ]


# The speedrun's recipe tools, all at once (test_recipe_tools.py checks each against its
# definition): the resume below must bring back Muon's momentum, the auxiliary SGD's and
# the mixing's draws, and the test must see the shifted copies.
RECIPE_TOOLS = [
    "optimizer=muon",
    "data.mixup_alpha=0.2",
    "data.cutmix_alpha=1.0",
    "data.tta_flip=true",
    "data.tta_translate=1",
]


def test_lr_auto_trains_as_the_found_rate_would_and_resumes_with_it(tmp_path: Path):
    """optimizer.lr=auto, stopped by SIGTERM and resumed, ends with the same metrics and
    weights as an uninterrupted run given the found value by hand: the finder's training
    is thrown away (same initial weights, data order, dropout), and the resume takes the
    value from the checkpoint instead of searching again. With optimizer=muon, mixup,
    cutmix and translate TTA, whose state and draws a resume must bring back."""
    recipe = [*RESUMABLE, *RECIPE_TOOLS]
    auto = tmp_path / "auto"
    output = stop_in_second_epoch([*recipe, "optimizer.lr=auto"], auto, tmp_path)
    found = json.loads((auto / "lr_find" / "lr_find.json").read_text())["suggested_lr"]
    assert f"optimizer.lr=auto: {found:.4g}" in output

    resumed = run_cli(
        [*recipe, "optimizer.lr=auto", f"trainer.resume={auto}", f"hydra.run.dir={auto}"], tmp_path
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "lr_find:" not in resumed.stdout, "no second search"
    assert f"optimizer.lr=auto: {found:.4g}, found when the run started" in resumed.stdout

    by_hand = run_cli(
        [*recipe, f"optimizer.lr={found!r}", f"hydra.run.dir={tmp_path / 'hand'}"], tmp_path
    )
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    assert_same_run(auto, tmp_path / "hand")
    record = (auto / "train.log").read_text()
    # one epoch of this data is 44 steps: the range test is no longer (not 300 steps)
    assert "optimizer.lr=auto: a range test of 44 steps (one epoch of this data is 44" in record
    assert "lr_find: 44 steps" in record

    evaluated = command("stable-cnn-eval", f"checkpoint={auto}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    (written,) = (auto / "eval").glob("*/eval.json")
    seen = json.loads(written.read_text())
    results = json.loads((auto / "results.json").read_text())
    assert seen["tta_translate"] == 1 and seen["tta_flip"]
    assert seen["test_acc"] == results["test_acc"], "eval sees the test as the run did"


@pytest.mark.parametrize(
    ("cli", "overrides", "expected"),
    [
        (
            "stable-cnn-train",
            ["optimizer.lr=auto", "trainer.devices=2"],
            "optimizer.lr=auto finds the learning rate in one process",
        ),
        (
            "stable-cnn-lr-find",
            ["lr_find.max_lr=1e-4"],
            "lr_find.max_lr=0.0001 is not allowed: must be more than",
        ),
        (
            "stable-cnn-lr-find",
            ["lr_find.min_lr=1e-6", "lr_find.max_lr=1e-3"],
            "the loss was still falling at lr_find.max_lr=0.001: raise lr_find.max_lr",
        ),
    ],
)
def test_lr_mistakes_are_one_line(cli: str, overrides: list[str], expected: str, tmp_path: Path):
    done = command(cli, *TINY, *overrides, "hydra.run.dir=run", cwd=tmp_path)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stdout
    assert not (tmp_path / "run").exists()


def test_the_rule_on_made_up_curves():
    """The edge is where the smoothed loss leaves 5% above its minimum; the suggestion
    half of it; a curve that never turns upwards is one line, not a guess."""
    settings = LRFindConfig()
    rates = learning_rates(settings)  # a valley whose floor ends at 0.3 (smoothing blurs it)
    valley = [2.3 - min(lr, 0.3) * 3 + max(0.0, lr - 0.3) * 10 for lr in rates]
    finding = suggest(LRCurve(rates, valley, True, 1.0), settings)
    assert (
        0.25 <= finding.max_stable_lr <= 0.32 and finding.suggested_lr == finding.max_stable_lr / 2
    )
    assert finding.max_stable_lr == rates[207], "a finite curve's edge, as it always was"
    falling = [2.3 - 0.2 * index / len(rates) for index in range(len(rates))]
    with pytest.raises(ConfigError, match=r"still falling at lr_find\.max_lr=10:"):
        suggest(LRCurve(rates, falling, False, 1.0), settings)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_the_edge_stays_below_a_curve_that_turns_nan(bad: float):
    """A loss that falls, then is NaN (or Inf) from step 201 of 300 on, as unclipped fp16
    does: the smoothed loss past it is no loss at all, so the edge and the suggestion lie
    below the last learning rate whose loss was finite."""
    settings = LRFindConfig()
    rates = learning_rates(settings)
    losses = [2.3 - 3 * lr if step <= 200 else bad for step, lr in enumerate(rates)]
    finding = suggest(LRCurve(rates, losses, True, 1.0), settings)
    assert finding.max_stable_lr <= rates[200] and finding.suggested_lr <= rates[200], (
        finding.max_stable_lr
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_curve_never_finite_is_one_line(bad: float):
    settings = LRFindConfig()
    rates = learning_rates(settings)[:10]  # the sweep stops at its first read
    with pytest.raises(ConfigError, match=r"NaN/Inf .*lower lr_find\.min_lr"):
        suggest(LRCurve(rates, [bad] * len(rates), True, 1.0), settings)


def test_a_stray_nan_step_is_stepped_around_not_the_end():
    """One NaN loss past the minimum: the sweep goes on as before (a run of them stops it),
    and the edge stays below it."""
    settings = LRFindConfig()
    rates = learning_rates(settings)
    valley = [2.3 - min(lr, 0.3) * 3 + max(0.0, lr - 0.3) * 10 for lr in rates]
    valley[204] = math.nan  # lr 0.26: inside the valley's 5% band, before its edge at 0.29
    assert not has_diverged(LRCurve(rates[:210], valley[:210], False, 1.0), 4.0)
    assert suggest(LRCurve(rates, valley, True, 1.0), settings).max_stable_lr < rates[204]
