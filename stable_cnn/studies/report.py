"""``stable-cnn-report``: one table for a sweep (or any folder of runs).

Finds every run folder below a path (a folder with Hydra's ``.hydra/overrides.yaml``),
names each run by the overrides that set it apart from the others, groups runs that
differ only in ``trainer.seed`` (mean ± std over seeds), sorts by the chosen metric,
and writes report.md, report.csv and a PNG of validation-accuracy curves.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stable_cnn.config.trainer import MONITORED
from stable_cnn.errors import UserError
from stable_cnn.state.run_files import holds_a_record, read_failure, read_metrics
from stable_cnn.studies.optuna_study import IMPORTANCES_PLOT, STUDY_FILE
from stable_cnn.system.plotting import pyplot

# Overrides that do not change what a run computes, or only choose how the sweep runs:
# left out of run names (overrides shared by every run are listed once, above the table).
NOT_IN_NAMES = (
    "hydra.",
    "hydra/",
    "hparams_search=",
    "trainer.resume=",
    "trainer.progress_bar=",
    "trainer.num_threads=",
)
SEED_KEY = "trainer.seed"
# Columns a table shows where any of its runs has them: results.json key -> heading.
EXTRA_TEST_METRICS = {"test_f1": "test macro-F1 (%)", "test_top5": "test top-5 (%)"}
# What a report may sort by: results.json's keys (best_<monitor>: trainer.monitor's best).
METRICS = (
    "best_val_acc",
    "test_acc",
    "test_f1",
    "test_top5",
    "best_val_loss",
    "best_val_f1",
    "best_val_top5",
)


@dataclass
class RunRecord:
    """One run folder, read back."""

    folder: Path
    overrides: list[str]
    status: str  # finished | pruned | diverged | interrupted | failed | unfinished
    reason: str = ""
    results: dict[str, float] = field(default_factory=dict)
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val_acc)

    def chosen(self) -> dict[str, str]:
        """The run's overrides as key -> value (Hydra's +, ++ and ~ prefixes dropped)."""
        return dict(_plain(o).split("=", 1) for o in self.overrides if "=" in o)


@dataclass
class ConfigRow:
    """The runs of one configuration (several seeds, or one run)."""

    name: str
    runs: list[RunRecord]

    def values(self, metric: str) -> list[float]:
        return [
            run.results[metric]
            for run in self.runs
            if run.status == "finished" and run.results.get(metric) is not None
        ]

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def status(self) -> str:
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        if len(self.runs) == 1:
            return self.runs[0].status
        return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))

    @property
    def reasons(self) -> str:
        return "; ".join(sorted({run.reason for run in self.runs if run.reason}))


def find_runs(root: Path) -> list[RunRecord]:
    """Every training run below ``root`` (``root`` itself included), in folder order: a
    folder with Hydra's record of a stable-cnn-train config and a run's own files
    (checkpoints, metrics, results or a failure record), not what other commands or
    older versions left (an eval's or export's folder, a run refused before it began)."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass a sweep or run folder (e.g. outputs/)")
    folders = sorted(
        {path.parent.parent for path in root.glob("**/.hydra/overrides.yaml")}, key=_natural_key
    )
    return [read_run(folder) for folder in folders if is_training_run(folder)]


def is_training_run(folder: Path) -> bool:
    if not holds_a_record(folder):
        return False
    config = OmegaConf.load(folder / ".hydra" / "config.yaml")
    return "trainer" in config


def read_run(folder: Path) -> RunRecord:
    overrides = OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
    record = RunRecord(folder=folder, overrides=[str(item) for item in overrides or []], status="")
    record.val_curve = [
        (epoch["epoch"], epoch["val_acc"])
        for epoch in read_metrics(folder)
        if epoch.get("val_acc") is not None
    ]
    failure = read_failure(folder)
    if (folder / "results.json").is_file():
        record.status = "finished"
        record.results = json.loads((folder / "results.json").read_text())
    elif failure is not None:
        record.status, record.reason = failure["status"], failure["reason"]
    elif (reason := _logged_error(folder / "train.log")) is not None:
        record.status, record.reason = "failed", reason  # e.g. a checkpoint it could not write
    else:
        record.status = "unfinished"  # still running, or killed without a chance to say
    if record.status != "finished" and record.val_curve:  # how far it got (a pruned trial)
        record.results.update(best_so_far(folder))
        record.results["epochs"] = record.val_curve[-1][0]
    return record


def best_so_far(folder: Path) -> dict[str, Any]:
    """An unfinished run's best epoch as its results.json would give it: chosen by its
    trainer.monitor (the weight average's values with ema=on), with that epoch's
    validation accuracy as ``best_val_acc``."""
    trainer = OmegaConf.load(folder / ".hydra" / "config.yaml").get("trainer") or {}
    monitor = str(trainer.get("monitor", "val_acc"))
    direction = trainer.get("monitor_mode") or MONITORED.get(monitor, "max")
    epochs = read_metrics(folder)

    def value(epoch: dict[str, Any], name: str) -> float | None:
        return epoch.get(f"{name}_ema", epoch.get(name))

    scored = [e for e in epochs if value(e, monitor) is not None]
    if not scored:
        return {}
    sign = 1 if direction == "min" else -1
    best = min(scored, key=lambda e: (sign * value(e, monitor), e["epoch"]))
    return {
        "monitor": monitor,
        "best_val_acc": value(best, "val_acc"),
        f"best_{monitor}": value(best, monitor),
    }


def _plain(override: str) -> str:
    """An override without Hydra's +, ++ and ~ prefixes."""
    return override.lstrip("+~")


def group_runs(runs: list[RunRecord], metric: str) -> tuple[list[ConfigRow], list[str]]:
    """Rows (one per configuration, best first) and the overrides common to every run.
    Runs whose overrides differ only in ``trainer.seed`` form one configuration."""
    settings = [
        [
            o
            for o in map(_plain, run.overrides)
            if not o.startswith(NOT_IN_NAMES) and not o.startswith(SEED_KEY + "=")
        ]
        for run in runs
    ]
    first = settings[0] if runs else []
    common = [o for o in first if all(o in items for items in settings)]
    rows: dict[tuple[str, ...], ConfigRow] = {}
    for run, items in zip(runs, settings, strict=True):
        own = [o for o in items if o not in common]
        key = tuple(sorted(own))  # the same settings in another order are the same config
        name = " ".join(short_override(o) for o in own) or "(common settings)"
        rows.setdefault(key, ConfigRow(name, [])).runs.append(run)

    sign = 1 if "loss" in metric else -1  # best first: a loss lowest, the others highest

    def rank(row: ConfigRow) -> tuple[bool, float]:
        mean = row.mean(metric)
        return (mean is None, sign * (mean if mean is not None else 0.0))

    return sorted(rows.values(), key=rank), common


def metric_columns(rows: list[ConfigRow], metric: str = "best_val_acc") -> dict[str, str]:
    """The table's metric columns (results.json key -> heading): the best validation
    accuracy, each other trainer.monitor the runs watched (its best value), the test
    accuracy, and macro-F1 and top-5 where the runs have them; one line where no run
    has the ``metric`` the table is sorted by."""
    runs = [run for row in rows for run in row.runs]
    monitors = sorted({str(run.results.get("monitor", "val_acc")) for run in runs} - {"val_acc"})
    found = {key for run in runs for key in run.results}
    if metric.startswith("best_val_") and metric != "best_val_acc" and metric not in found:
        raise UserError(
            f"no run here has {metric} (a run records best_<monitor> for its "
            f"trainer.monitor): sort by best_val_acc or test_acc"
        )
    return {
        "best_val_acc": "best val acc (%)",
        **{f"best_{monitor}": f"best {monitor}" for monitor in monitors},
        "test_acc": "test acc (%)",
        **{key: heading for key, heading in EXTRA_TEST_METRICS.items() if key in found},
    }


def render_markdown(rows: list[ConfigRow], common: list[str], root: Path, metric: str) -> str:
    out = io.StringIO()
    total = sum(len(row.runs) for row in rows)
    out.write(f"# Sweep report: {root}\n\n")
    out.write(
        f"{total} runs in {len(rows)} configurations, sorted by {metric} of the "
        "finished runs (mean ± sample std over seeds where a configuration has "
        "several).\n"
    )
    if common:
        out.write(f"Common to every run: `{_cell(' '.join(common))}`\n")
    columns = metric_columns(rows, metric)
    out.write(
        f"\n| run | finished | {' | '.join(columns.values())} | epochs | wall (s) | status |\n"
    )
    out.write(f"|---|---:|{'---:|' * len(columns)}---:|---:|---|\n")
    for row in rows:
        finished = sum(run.status == "finished" for run in row.runs)
        epochs = _mean_or_none([r.results.get("epochs") for r in row.runs if r.results])
        wall = _mean_or_none([r.results.get("wall_s") for r in row.runs if r.results])
        status = row.status + (f": {row.reasons}" if row.reasons else "")
        out.write(
            f"| `{_cell(row.name)}` | {finished}/{len(row.runs)} | "
            f"{' | '.join(_mean_std(row, key) for key in columns)} | "
            f"{_number(epochs, 0)} | {_number(wall, 0)} | {_cell(status)} |\n"
        )
    return out.getvalue()


def render_study(study: dict[str, Any], root: Path, out_dir: Path) -> str:
    """The study's section: its trials by state, the best one and its run folder, and
    what the value depended on (parameter importances, table and plot)."""
    out = io.StringIO()
    states = ", ".join(f"{n} {state.lower()}" for state, n in sorted(study["states"].items()))
    out.write(f"\n## Study {study['study_name']} ({study['direction']})\n\n")
    out.write(f"{sum(study['states'].values())} trials in all invocations: {states}.\n")
    if study.get("best_trial") is None:
        return out.getvalue() + "No trial has finished yet.\n"
    folder = study.get("best_run_folder")
    where = ""
    if folder:
        shown = Path(folder)
        if shown.is_absolute() and shown.is_relative_to(root.resolve()):
            shown = shown.relative_to(root.resolve())
        where = f", run folder `{_cell(str(shown))}`"
    params = " ".join(short_override(f"{k}={v}") for k, v in (study["best_params"] or {}).items())
    out.write(f"Best: trial {study['best_trial']}, value {study['best_value']:.4g}{where}:\n")
    out.write(f"`{_cell(params)}`\n")
    found = study.get("importances")
    if not found:
        return out.getvalue() + f"\n{study.get('importances_note', '')}\n"
    out.write(f"\n| parameter | importance ({study['importances_note']}) |\n|---|---:|\n")
    for key, value in found.items():
        out.write(f"| `{_cell(key)}` | {value:.3f} |\n")
    plot = root / IMPORTANCES_PLOT
    if plot.is_file():
        link = os.path.relpath(plot, out_dir.resolve())
        out.write(f"\n![parameter importances]({link})\n")
    return out.getvalue()


def write_csv(rows: list[ConfigRow], path: Path) -> None:
    metrics = list(metric_columns(rows))
    columns = [
        "run",
        "runs",
        "finished",
        *(f"{key}_{stat}" for key in metrics for stat in ("mean", "std")),
        "epochs",
        "wall_s",
        "status",
        "reason",
        "folders",
    ]
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            finished = [r for r in row.runs if r.status == "finished"]
            writer.writerow(
                [
                    row.name,
                    len(row.runs),
                    len(finished),
                    *(value for key in metrics for value in (row.mean(key), row.std(key))),
                    _mean_or_none([r.results.get("epochs") for r in finished]),
                    _mean_or_none([r.results.get("wall_s") for r in finished]),
                    row.status,
                    row.reasons,
                    ";".join(str(r.folder) for r in row.runs),
                ]
            )


def plot_val_curves(rows: list[ConfigRow], path: Path) -> bool:
    """Validation accuracy per epoch, one colour per configuration; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for index, row in enumerate(rows):
        labelled = False
        for run in row.runs:
            if not run.val_curve:
                continue
            epochs, accuracies = zip(*run.val_curve, strict=True)
            axes.plot(
                epochs,
                accuracies,
                marker="o",
                markersize=3,
                color=colours(index % colours.N),
                alpha=0.85,
                linestyle="-" if run.status == "finished" else ":",
                label=None if labelled else _legend_label(row.name),
            )
            labelled = True
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title("validation accuracy per run (dotted: did not finish)")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(root: Path, out_dir: Path, metric: str = "best_val_acc") -> list[Path]:
    """report.md, report.csv and val_acc.png (with matplotlib) in ``out_dir``."""
    runs = find_runs(root)
    if not runs:
        raise UserError(f"no runs under {root}: a run folder holds .hydra/overrides.yaml")
    rows, common = group_runs(runs, metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.md", out_dir / "report.csv"]
    study = root / STUDY_FILE  # an Optuna search's: what its study found
    markdown = render_markdown(rows, common, root, metric)
    if study.is_file():
        markdown += render_study(json.loads(study.read_text()), root, out_dir)
    written[0].write_text(markdown)
    write_csv(rows, written[1])
    if plot_val_curves(rows, out_dir / "val_acc.png"):
        written.append(out_dir / "val_acc.png")
    return written


def _logged_error(log_path: Path) -> str | None:
    """The last ``error:`` line that the run logged, if any."""
    if not log_path.is_file():
        return None
    errors = [
        line.split("error: ", 1)[1]
        for line in log_path.read_text().splitlines()
        if "error: " in line
    ]
    return errors[-1] if errors else None


def short_override(override: str) -> str:
    """key=value with long floats (Optuna's) cut to 4 significant digits."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    if "." in value and len(value) > 6 and math.isfinite(number):
        value = f"{number:.4g}"
    return f"{key}={value}"


def _legend_label(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _mean_or_none(values: list[float | None]) -> float | None:
    numbers = [v for v in values if v is not None]
    return statistics.fmean(numbers) if numbers else None


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _mean_std(row: ConfigRow, metric: str) -> str:
    mean, std = row.mean(metric), row.std(metric)
    digits = 4 if "loss" in metric else 2  # a loss's digits are below 1
    if mean is None:
        so_far = [r.results[metric] for r in row.runs if r.results.get(metric) is not None]
        if not so_far:
            return "-"
        return f"({(min if 'loss' in metric else max)(so_far):.{digits}f})"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _cell(text: str) -> str:
    """Text that cannot break a markdown table row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _natural_key(path: Path) -> list[tuple[int, int, str]]:
    """Sort job folders 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]
