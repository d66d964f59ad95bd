"""``stable-cnn-ablate``: what each stabilising technique contributes.

Trains the full recipe and one variant per removed technique (BatchNorm, dropout,
gradient clipping, the learning-rate schedule, mixed precision), several seeds each,
at a normal learning rate and at a stress learning rate several times too high; then
writes a markdown report (test accuracy mean ± std, overfitting gap, diverged runs, clip
rate, one sentence of evidence per row) and a PNG of validation curves per variant.

The variants are the ``ablation`` config group (conf/ablation/), and the whole study is
one ``stable-cnn-train -m ablation=full,no_batchnorm,... optimizer.lr=NORMAL,STRESS
'trainer.seed=range(N)'`` sweep with ``trainer.resume=auto``: rerunning the same command
skips finished runs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from stable_cnn.state.run_files import read_metrics
from stable_cnn.studies.report import RunRecord, find_runs
from stable_cnn.studies.sweep import COLLAPSED_BELOW, SeedOutcomes, spread, standard_error
from stable_cnn.system.plotting import pyplot
from stable_cnn.training.evaluation import training_accuracy

# conf/ablation/<name>.yaml: each of these removes one technique from the full recipe (the
# group also holds the stability map's other variants: stable_cnn/studies/stability_map.py).
VARIANTS: dict[str, str] = {
    "full": "the tutorial's recipe: BatchNorm, dropout, clipping, cosine schedule, AMP",
    "no_batchnorm": "no BatchNorm (conv bias back on)",
    "no_dropout": "no Dropout2d, no head dropout",
    "no_clipping": "no gradient clipping",
    "constant_lr": "constant learning rate instead of cosine decay",
    "no_amp": "fp32 instead of mixed precision",
}
# The study removes the tutorial's techniques from the tutorial's recipe (experiment=tutorial:
# heavy dropout, lr 0.05, per-epoch cosine), not from stable-cnn's defaults, which already
# drop most of the dropout because of this study's finding.
# The default study: about 30 minutes on a 2-core CPU; --full is the tutorial's size (GPU).
# 5,000 training images for 12 epochs: long enough to overfit, so that dropout has a job.
RECIPE = "experiment=tutorial"
SMALL = [RECIPE, "model.width=16", "trainer.epochs=12", "data.limit_train=5000"]
FULL = [RECIPE, "model.width=64", "trainer.epochs=30"]
GAP_IMAGES = 5000  # training images used to measure train accuracy (eval mode)


@dataclass
class VariantResult(SeedOutcomes):
    name: str
    setting: str  # "normal" or "stress"
    description: str
    runs: list[RunRecord] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # train acc (eval mode) - val acc, points
    clip_rates: list[float] = field(default_factory=list)


def collect(out: Path, lrs: dict[str, float], device: str) -> list[VariantResult]:
    """One row per (variant, setting), in VARIANTS order, normal setting first."""
    rows = {
        (name, setting): VariantResult(name, setting, description)
        for setting in lrs
        for name, description in VARIANTS.items()
    }
    settings = {lr: setting for setting, lr in lrs.items()}
    for run in find_runs(out):
        chosen = run.chosen()
        setting = settings.get(float(chosen.get("optimizer.lr", "nan")))
        row = rows.get((chosen.get("ablation", ""), setting or ""))
        if row is None:
            continue  # not part of this study (another learning rate, say)
        row.runs.append(run)
        epochs = read_metrics(run.folder)
        row.clip_rates += [e["clip_fraction"] for e in epochs if "clip_fraction" in e]
        last = run.folder / "checkpoints" / "last.pt"
        if run.status == "finished" and epochs and last.exists():
            row.gaps.append(training_accuracy(last, GAP_IMAGES, device) - epochs[-1]["val_acc"])
    return list(rows.values())


def evidence(row: VariantResult, full: VariantResult) -> str:
    """One sentence: what this row shows against the full recipe in the same setting."""
    total = len(row.runs)
    if row.diverged == total and total:
        return f"Diverged in every seed ({total}/{total})" + (
            "." if full.diverged < len(full.runs) else ", as did the full recipe."
        )
    accuracies, baseline = row.accuracies(), full.accuracies()
    failures = [
        f"diverged in {row.diverged}/{total} seeds" if row.diverged else "",
        f"collapsed in {row.collapsed}/{total}" if row.collapsed else "",
    ]
    diverged = "".join(f"; {failure}" for failure in failures if failure)
    if row is full:
        return f"The reference{diverged}."
    if not accuracies or not baseline:
        return "Too few finished runs to compare."
    delta = statistics.fmean(accuracies) - statistics.fmean(baseline)
    gap = ""
    if row.gaps and full.gaps:
        gap_delta = statistics.fmean(row.gaps) - statistics.fmean(full.gaps)
        if abs(gap_delta) >= 1.0:
            gap = f", overfitting gap {'+' if gap_delta > 0 else ''}{gap_delta:.1f} points"
    if min(len(accuracies), len(baseline)) < 2:
        verdict = f"{delta:+.2f} points against the full recipe (one seed: no spread measured)"
    elif spread(accuracies) > max(3 * spread(baseline), 5.0):
        low, high = min(accuracies), max(accuracies)
        verdict = (
            f"Unstable: test accuracy ranges from {low:.1f}% to {high:.1f}% across "
            f"seeds ({delta:+.2f} points on average)"
        )
    elif abs(delta) <= 2 * standard_error(accuracies, baseline):
        verdict = f"Within two standard errors of the full recipe ({delta:+.2f} points)"
    elif delta < 0:
        verdict = f"Removing it costs {-delta:.2f} points of test accuracy"
    else:
        verdict = f"Removing it gains {delta:.2f} points at this size"
    return f"{verdict}{gap}{diverged}."


def render(rows: list[VariantResult], command: str, machine: str, settings: str) -> str:
    fulls = {row.setting: row for row in rows if row.name == "full"}
    lines = [
        "# Ablation: what each technique contributes",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Settings: {settings}",
        "",
        "Test accuracy is the best-validation checkpoint's, mean ± std over seeds; the gap is",
        f"training accuracy (first {GAP_IMAGES:,} training images, eval mode, no augmentation)",
        "minus validation accuracy after the last epoch; clip rate is the fraction of steps",
        "whose gradient norm clipping reduced; diverged counts runs stopped by NaN/Inf,",
        f"collapsed the finished runs whose test accuracy stayed under {COLLAPSED_BELOW:.0f}%",
        "(twice chance). A difference counts when it exceeds two standard errors.",
        "",
        "| variant | setting | test acc (%) | train-val gap | diverged | collapsed | clip rate "
        "| evidence |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        accuracies = row.accuracies()
        accuracy = (
            f"{statistics.fmean(accuracies):.2f} ± {spread(accuracies):.2f}" if accuracies else "-"
        )
        gap = f"{statistics.fmean(row.gaps):+.2f}" if row.gaps else "-"
        clip = f"{100 * statistics.fmean(row.clip_rates):.0f}%" if row.clip_rates else "-"
        lines.append(
            f"| {row.name} | {row.setting} | {accuracy} | {gap} | {row.diverged}/{len(row.runs)} "
            f"| {row.collapsed}/{len(row.runs)} "
            f"| {clip} | {evidence(row, fulls[row.setting])} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[VariantResult], path: Path) -> bool:
    """Mean validation accuracy per epoch, one line per variant, one panel per setting."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import MaxNLocator

    settings = sorted({row.setting for row in rows})
    figure, panels = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for panel, setting in zip(panels[0], settings, strict=True):
        for row in (r for r in rows if r.setting == setting):
            curves = [dict(run.val_curve) for run in row.runs if run.val_curve]
            epochs = sorted({epoch for curve in curves for epoch in curve})
            means = [statistics.fmean(c[e] for c in curves if e in c) for e in epochs]
            if epochs:
                panel.plot(epochs, means, marker="o", markersize=3, label=row.name)
        panel.set_title(f"{setting} learning rate")
        panel.set_xlabel("epoch")
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.set_ylabel("validation accuracy (%), mean over seeds")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
