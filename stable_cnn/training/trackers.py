"""The experiment stores a run reports to besides TensorBoard (the logger group:
logger=csv, mlflow, wandb). RunTracker (tracking.py), the one place that feeds
TensorBoard, hands each of them the same things at the same points: every scalar under
TensorBoard's name at its step, the figures, metrics.jsonl's row of each epoch, the
results, and how the run ended; so a metric has one code path whatever the stores.

A store that sends scalars elsewhere holds them until ``commit``: RunTracker commits
once a checkpoint covers them (and when the run ends), so a resumed run, which goes on
from its checkpoint, never sends a step twice, and no step waits on a store.
"""

from __future__ import annotations

import csv
import io
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from stable_cnn.config.logger import LoggerConfig
from stable_cnn.errors import ConfigError
from stable_cnn.state.run_files import read_metrics
from stable_cnn.system.atomic import atomic_write

CSV_FILE = "metrics.csv"


# how a run ended, when it will not be resumed: what a store holds goes out at its close
# (a run interrupted or failed goes on from its checkpoint and logs the rest again)
ENDED_FOR_GOOD = ("finished", "diverged", "pruned")


class Tracker(Protocol):
    """An experiment store, as RunTracker feeds it."""

    run_id: str | None  # the store's own run, saved in checkpoints so a resume continues it

    def log_scalars(self, global_step: int, scalars: dict[str, float]) -> None: ...

    def log_figure(self, global_step: int, tag: str, figure: Any) -> None: ...  # matplotlib

    def log_epoch(self, record: dict[str, Any]) -> None: ...

    def log_results(self, results: dict[str, Any]) -> None: ...

    def commit(self) -> None: ...  # a checkpoint now covers what was logged: send it

    # finished, interrupted, diverged, pruned, or failed (an error nobody caught)
    def close(self, status: str) -> None: ...


@dataclass(frozen=True)
class RunLabels:
    """How the stores name and file a run: chosen by the command, like its folder."""

    name: str  # the run folder's date/time, a sweep job's folder name
    folder: Path  # the run folder (artifacts come from there)
    experiment: str  # the experiment preset's name, or stable-cnn
    params: dict[str, Any] = field(default_factory=dict)  # the composed config, flattened
    varied: dict[str, str] = field(default_factory=dict)  # a sweep's swept keys (or overrides)
    sweep: str | None = None  # a sweep job's sweep folder
    parent_runs: dict[str, str] = field(default_factory=dict)  # a sweep's run, per store


def one_line(err: BaseException) -> str:
    """A store's error in a log line: its words on one line, cut to a readable length."""
    return " ".join(str(err).split())[:300] or type(err).__name__


def run_labels(
    folder: Path,
    composed: dict[str, Any],
    varied: dict[str, str],
    experiment: str | None = None,
    sweep: str | None = None,
    parent_runs: dict[str, str] | None = None,
) -> RunLabels:
    """A run's labels: ``varied`` the keys that set it apart, with their values."""
    return RunLabels(
        run_name(folder, sweep),
        folder,
        experiment or "stable-cnn",
        flat_params(composed),
        varied,
        sweep,
        parent_runs or {},
    )


def run_name(folder: Path, sweep: str | None) -> str:
    """Like the folder: ``2026-12-03/08-30-00``, a sweep job's ``3_optimizer.lr=0.1``."""
    return folder.name if sweep is not None else "/".join(folder.parts[-2:])


def in_folder(labels: RunLabels, folder: Path) -> RunLabels:
    """The labels of a run that goes on in ``folder`` (the run it resumed)."""
    if folder == labels.folder:
        return labels
    return replace(labels, folder=folder, name=run_name(folder, labels.sweep))


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A composed config as ``key.path -> value`` (a number stays a number: W&B plots it)."""
    params: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{name}."))
        else:
            params[name] = value
    return params


def as_text(value: Any) -> str:
    """A config value as YAML writes it (null, true, false), for stores that keep text."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return str(value)


INSTALL = {"mlflow": "mlflow", "wandb": "wandb"}  # store -> the package it needs


def check_stores(logger: LoggerConfig) -> None:
    """Refuse, before anything starts, a store whose package is missing or whose place
    cannot hold runs."""
    from importlib.util import find_spec

    for store in logger.trackers:
        package = INSTALL.get(store)
        if package is not None and find_spec(package) is None:
            raise ConfigError(
                f"logger={store} needs the {package} package: pip install "
                f"'stable-cnn[{store}]' (or pip install {package})"
            )
    if logger.mlflow:
        from stable_cnn.training.mlflow_tracker import tracking_uri

        tracking_uri(logger.tracking_uri)  # a folder store is refused


class CsvTracker:
    """metrics.csv in the run folder: metrics.jsonl as a spreadsheet, one row per epoch,
    its columns in metrics.jsonl's order (a per-class mapping as one column per class:
    ``val_per_class_acc/<class>``). Rewritten from metrics.jsonl after every epoch, so
    a resumed run's file is its metrics.jsonl's, never a row twice."""

    run_id = None

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        if (run_dir / "metrics.jsonl").exists():  # a resumed run: its epochs so far, now
            self.log_epoch({})

    def log_scalars(self, global_step: int, scalars: dict[str, float]) -> None:
        pass

    def log_figure(self, global_step: int, tag: str, figure: Any) -> None:
        pass

    def log_epoch(self, record: dict[str, Any]) -> None:
        rows = [flat_row(epoch) for epoch in read_metrics(self.run_dir)]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_write(self.run_dir / CSV_FILE) as out:
            out.write(text.getvalue().encode())

    def log_results(self, results: dict[str, Any]) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self, status: str) -> None:
        pass


def flat_row(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl record with its mappings spread into ``key/name`` columns."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            row.update({f"{key}/{name}": inner for name, inner in value.items()})
        else:
            row[key] = value
    return row


def open_trackers(
    logger: LoggerConfig, labels: RunLabels, run_ids: dict[str, str], resume_step: int = 0
) -> list[Tracker]:
    """The stores ``logger`` turns on, for the run ``labels`` name (rank 0's); a store
    whose run is in ``run_ids`` (the checkpoint's, resumed from at ``resume_step``)
    continues that run, and a new run's id is added there."""
    trackers: list[Tracker] = []
    try:
        if logger.csv:
            trackers.append(CsvTracker(labels.folder))
        if logger.mlflow:
            from stable_cnn.training.mlflow_tracker import MlflowTracker

            trackers.append(MlflowTracker(logger, labels, run_ids.get("mlflow")))
        if logger.wandb:
            from stable_cnn.training.wandb_tracker import WandbTracker

            trackers.append(WandbTracker(logger, labels, run_ids.get("wandb"), resume_step))
    except BaseException as err:
        for opened in trackers:  # a store that did open does not stay open as running
            with suppress(Exception):  # the error that stopped the opening is the one to tell
                opened.close("failed")
        if isinstance(err, Exception) and not isinstance(err, ConfigError):
            store = logger.trackers[len(trackers)]  # the one that was opening
            raise ConfigError(f"logger={store}: its run did not open ({one_line(err)})") from None
        raise
    for name, tracker in zip(logger.trackers, trackers, strict=True):
        if tracker.run_id is not None:
            run_ids[name] = tracker.run_id
    return trackers
