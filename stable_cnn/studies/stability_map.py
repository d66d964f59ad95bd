"""``stable-cnn-map``: the learning rates at which each technique keeps training alive.

For each variant of the recipe (the ``ablation`` config group: the defaults, one technique
removed or changed, EMA added, the tutorial's literal recipe) it trains a log-spaced grid
of learning rates with several seeds, as one resumable ``stable-cnn-train -m`` sweep, and
writes a report: accuracy against learning rate per variant (a PNG with the seeds' spread
as a band), and per variant the best accuracy, the **stable range** (the contiguous
learning rates, around the best, at which every seed finished within ``MARGIN`` points of
the variant's best mean and none collapsed or diverged), its width in decades, and one
sentence of evidence against the full recipe, judged by the ablation's two-standard-error
rule at each learning rate.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from stable_cnn.studies.report import RunRecord, find_runs
from stable_cnn.studies.sweep import (
    COLLAPSED_BELOW,
    SeedOutcomes,
    spread,
    standard_error,
)
from stable_cnn.system.plotting import pyplot

# conf/ablation/<name>.yaml, applied to the default recipe.
VARIANTS: dict[str, str] = {
    "full": "the default recipe (BatchNorm, clip norm 1.0, warm-up + cosine, light dropout, AMP)",
    "no_batchnorm": "no BatchNorm (conv bias back on)",
    "no_clipping": "no gradient clipping",
    "clip_value": "clipping each gradient element to +-0.5 instead of the norm to 1.0",
    "no_warmup": "no learning-rate warm-up",
    "constant_lr": "a constant learning rate (no warm-up, no decay)",
    "no_dropout": "no dropout at all (the default has head dropout 0.1)",
    "with_ema": "the weight average added (ema=on)",
    "no_amp": "fp32 instead of mixed precision",
    "tutorial": "the tutorial's literal recipe (dropout 0.3/0.5, no Nesterov, per-epoch cosine)",
}
# 8 half-decade steps over 3.5 decades: from far too careful to far too bold for SGD.
LEARNING_RATES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# 240 runs of about 7 s on a 2-core AVX-512 BF16 CPU (docs/stability_map.md has the wall
# time); --full is for a GPU.
SMALL = [
    "model.width=16",
    "trainer.epochs=4",
    "data.limit_train=10000",
    "data.limit_test=2000",
    "diagnostics.figures_every_n_epochs=null",
]
FULL = ["model.width=64", "trainer.epochs=15", "diagnostics.figures_every_n_epochs=null"]
MARGIN = 3.0  # accuracy points below the variant's best mean that still count as stable


@dataclass
class Point(SeedOutcomes):
    """One variant at one learning rate: its seeds' outcomes."""

    lr: float
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        accuracies = self.accuracies()
        return statistics.fmean(accuracies) if accuracies else None


@dataclass
class Variant:
    name: str
    description: str
    points: list[Point]  # one per learning rate, ascending
    suggested_lr: float | None = None  # stable-cnn-lr-find's, at the map's settings (--lr-find)

    def best(self) -> Point | None:
        scored = [p for p in self.points if p.mean is not None]
        return max(scored, key=lambda p: p.mean) if scored else None


def stable_range(points: list[Point], margin: float = MARGIN) -> tuple[float, float] | None:
    """The contiguous learning rates (ascending ``points``) around the best stable one at
    which every seed finished within ``margin`` points of the best mean accuracy, none
    collapsed and none diverged; None when no learning rate qualifies."""
    means = [p.mean for p in points if p.mean is not None]
    if not means:
        return None
    floor = max(means) - margin

    def stable(point: Point) -> bool:
        accuracies = point.accuracies()
        return (
            bool(point.runs)
            and len(accuracies) == len(point.runs)
            and min(accuracies) >= max(floor, COLLAPSED_BELOW)
        )

    blocks: list[list[Point]] = []
    for previous, point in zip([None, *points], points, strict=False):
        if stable(point):
            if previous is not None and blocks and blocks[-1][-1] is previous:
                blocks[-1].append(point)
            else:
                blocks.append([point])
    if not blocks:
        return None
    best_block = max(blocks, key=lambda block: max(p.mean for p in block))
    return best_block[0].lr, best_block[-1].lr


def decades(span: tuple[float, float] | None) -> float:
    return 0.0 if span is None else math.log10(span[1] / span[0])


def describe_range(span: tuple[float, float] | None) -> str:
    if span is None:
        return "none"
    low, high = span
    return f"{low:g} only" if low == high else f"{low:g} to {high:g}"


def judge_suggestion(lr: float, span: tuple[float, float] | None, grid: list[float]) -> str:
    """Where the finder's suggestion falls against a measured stable range: "inside" (from
    its lowest to its highest stable learning rate), "in its cells" (nearer, in log, to a
    stable learning rate of the grid than to an unstable one: the map measures only its
    grid) or "outside"."""
    if span is None:
        return "outside"
    low, high = span
    if low <= lr <= high:
        return "inside"
    below = [g for g in grid if g < low]  # the cells end halfway (in log) to the neighbours
    above = [g for g in grid if g > high]
    floor = math.sqrt(low * max(below)) if below else low
    ceiling = math.sqrt(high * min(above)) if above else high
    return "in its cells" if floor <= lr <= ceiling else "outside"


def finder_summary(variants: list[Variant]) -> str:
    """One sentence: how many suggestions fall inside the stable ranges."""
    grid = [p.lr for p in variants[0].points]
    judged = [
        (v.name, judge_suggestion(v.suggested_lr, stable_range(v.points), grid))
        for v in variants
        if v.suggested_lr is not None
    ]
    inside = sum(verdict == "inside" for _, verdict in judged)
    near = sum(verdict != "outside" for _, verdict in judged)
    missed = [name for name, verdict in judged if verdict == "outside"]
    return (
        f"The learning-rate finder's suggestion (`stable-cnn-lr-find`, at the same "
        f"settings) falls inside the stable range for {inside} of {len(judged)} variants "
        f"and within its grid cells for {near} of {len(judged)}"
        + (f"; outside for {', '.join(missed)}." if missed else ".")
    )


def collect_suggestions(folder: Path, variants: list[Variant]) -> None:
    """Each variant's suggestion, from the finder's jobs under ``folder`` (lr_find.json,
    and the job's ablation=NAME in .hydra/overrides.yaml)."""
    by_name = {variant.name: variant for variant in variants}
    for found in sorted(folder.glob("*/lr_find.json")):
        overrides = found.parent / ".hydra" / "overrides.yaml"
        chosen = [
            line.split("ablation=", 1)[1].strip()
            for line in (overrides.read_text().splitlines() if overrides.exists() else [])
            if "ablation=" in line
        ]
        if chosen and chosen[-1] in by_name:
            by_name[chosen[-1]].suggested_lr = json.loads(found.read_text())["suggested_lr"]


def compare_points(variant: Variant, full: Variant) -> tuple[list[float], list[float]]:
    """The learning rates at which the variant is worse / better than the full recipe by
    more than two standard errors (a diverged seed counts as chance, 10%)."""
    worse, better = [], []
    for mine, reference in zip(variant.points, full.points, strict=True):
        a, b = _outcomes(mine), _outcomes(reference)
        if len(a) < 2 or len(b) < 2:
            continue
        delta = statistics.fmean(a) - statistics.fmean(b)
        if abs(delta) > 2 * standard_error(a, b):
            (worse if delta < 0 else better).append(mine.lr)
    return worse, better


def _outcomes(point: Point) -> list[float]:
    return point.accuracies() + [10.0] * point.diverged


def evidence(variant: Variant, full: Variant) -> str:
    """One sentence: what the sweep shows for this variant against the full recipe."""
    span, reference = stable_range(variant.points), stable_range(full.points)
    width = (
        "no stable range"
        if span is None
        else f"stable {describe_range(span)} ({decades(span):.1f} decades)"
    )
    if variant is full:
        return f"The reference: {width}."
    change = decades(span) - decades(reference)
    if span is None and reference is None:
        verdict = "no stable range, like the full recipe"
    elif abs(change) < 0.25:
        verdict = f"{width}, the same width as the full recipe's"
    else:
        direction = "narrower" if change < 0 else "wider"
        verdict = (
            f"{width} against the full recipe's {describe_range(reference)} "
            f"({direction} by {abs(change):.1f} decades)"
        )
    worse, better = compare_points(variant, full)
    judged = [
        f"worse beyond two standard errors at lr {_lrs(worse)}" if worse else "",
        f"better at lr {_lrs(better)}" if better else "",
    ]
    judged_text = "; ".join(j for j in judged if j) or "never beyond two standard errors apart"
    return f"{verdict[0].upper()}{verdict[1:]}; {judged_text}."


def _lrs(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def collect(out: Path, learning_rates: tuple[float, ...], names: list[str]) -> list[Variant]:
    variants = {
        name: Variant(name, VARIANTS[name], [Point(lr) for lr in learning_rates]) for name in names
    }
    for run in find_runs(out):
        chosen = run.chosen()
        variant = variants.get(chosen.get("ablation", ""))
        lr = float(chosen.get("optimizer.lr", "nan"))
        for point in variant.points if variant else []:
            if math.isclose(point.lr, lr):
                point.runs.append(run)
    return list(variants.values())


def render(variants: list[Variant], header: list[str]) -> str:
    full = next(v for v in variants if v.name == "full")
    learning_rates = [p.lr for p in full.points]
    lines = [
        "# The stability map: where each technique keeps training alive",
        "",
        *header,
        "",
        "Test accuracy of the best-validation checkpoint. A run **diverged** when it stopped",
        "on NaN/Inf losses; it **collapsed** when it finished under "
        f"{COLLAPSED_BELOW:.0f}% (twice chance). The",
        "**stable range** is the contiguous learning rates, around the variant's best, at",
        f"which every seed finished within {MARGIN:g} points of the variant's best mean "
        "accuracy and",
        "none collapsed or diverged. Evidence compares each learning rate with the full recipe",
        "by the ablation's rule: a difference counts beyond two standard errors (a diverged",
        "seed counts as 10%).",
        "",
        "## Headline",
        "",
    ]
    lines += [f"- **{v.name}**, {v.description}: {evidence(v, full)}" for v in variants]
    finder = any(v.suggested_lr is not None for v in variants)
    if finder:
        lines += ["", finder_summary(variants)]
    lines += [
        "",
        "## Per variant",
        "",
        "| variant | best test acc (%) | at lr | stable range | decades | diverged "
        "| collapsed |" + (" finder's lr | against the range |" if finder else ""),
        "|---|---:|---:|---|---:|---:|---:|" + ("---:|---|" if finder else ""),
    ]
    for variant in variants:
        best, span = variant.best(), stable_range(variant.points)
        runs = sum(len(p.runs) for p in variant.points)
        accuracy = f"{best.mean:.2f} ± {spread(best.accuracies()):.2f}" if best else "-"
        row = (
            f"| {variant.name} | {accuracy} | {best.lr if best else '-'} | "
            f"{describe_range(span)} | {decades(span):.1f} | "
            f"{sum(p.diverged for p in variant.points)}/{runs} | "
            f"{sum(p.collapsed for p in variant.points)}/{runs} |"
        )
        if finder:
            lr = variant.suggested_lr
            verdict = "-" if lr is None else judge_suggestion(lr, span, learning_rates)
            row += f" {'-' if lr is None else f'{lr:.3g}'} | {verdict} |"
        lines.append(row)
    lines += [
        "",
        "## Every learning rate",
        "",
        "Mean test accuracy (%) ± std over seeds; `d` diverged and `c` collapsed seeds.",
        "",
        "| variant | " + " | ".join(f"{lr:g}" for lr in learning_rates) + " |",
        "|---|" + "---:|" * len(learning_rates),
    ]
    for variant in variants:
        cells = []
        for point in variant.points:
            cell = (
                "-"
                if point.mean is None
                else f"{point.mean:.1f} ± {spread(point.accuracies()):.1f}"
            )
            marks = (f" {point.diverged}d" if point.diverged else "") + (
                f" {point.collapsed}c" if point.collapsed else ""
            )
            cells.append(cell + marks)
        lines.append(f"| {variant.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(variants: list[Variant], path: Path) -> bool:
    """Test accuracy against learning rate (log x), one curve per variant, the seeds'
    range as a band; a learning rate where every seed diverged is marked at chance."""
    plt = pyplot()
    if plt is None:
        return False

    figure, axes = plt.subplots(figsize=(10, 6))
    colours = plt.get_cmap("tab10")
    for index, variant in enumerate(variants):
        colour = colours(index % 10)
        scored = [p for p in variant.points if p.mean is not None]
        lrs = [p.lr for p in scored]
        style = "--" if variant.name == "tutorial" else "-"
        axes.plot(
            lrs,
            [p.mean for p in scored],
            marker="o",
            markersize=3,
            color=colour,
            label=variant.name,
            linestyle=style,
        )
        low, high = [min(p.accuracies()) for p in scored], [max(p.accuracies()) for p in scored]
        axes.fill_between(lrs, low, high, color=colour, alpha=0.12)
        lost = [p.lr for p in variant.points if p.runs and p.mean is None]
        axes.scatter(lost, [10.0] * len(lost), marker="x", color=colour)
    axes.set_xscale("log")
    axes.set_xlabel("peak learning rate (SGD)")
    axes.set_ylabel("test accuracy (%): mean over seeds, band = min to max")
    axes.axhline(COLLAPSED_BELOW, color="grey", linewidth=0.8, linestyle=":")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8, loc="lower left")
    axes.set_title("Stability map: x = every seed diverged")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
