"""The experiment stores a run reports to besides TensorBoard (the logger group:
logger=csv, and the ones to come). RunTracker (tracking.py), the one place that feeds
TensorBoard, hands each of them the same things at the same points: every scalar
under TensorBoard's name at its step, metrics.jsonl's row of each epoch, the results,
and how the run ended; so a metric has one code path whatever the stores.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Protocol

from stable_cnn.config.logger import LoggerConfig
from stable_cnn.state.run_files import read_metrics
from stable_cnn.system.atomic import atomic_write

CSV_FILE = "metrics.csv"


class Tracker(Protocol):
    """An experiment store, as RunTracker feeds it."""

    def log_scalars(self, global_step: int, scalars: dict[str, float]) -> None: ...

    def log_epoch(self, record: dict[str, Any]) -> None: ...

    def log_results(self, results: dict[str, Any]) -> None: ...

    def close(self, status: str) -> None: ...  # finished, interrupted, diverged, pruned


class CsvTracker:
    """metrics.csv in the run folder: metrics.jsonl as a spreadsheet, one row per epoch,
    its columns in metrics.jsonl's order (a per-class mapping as one column per class:
    ``val_per_class_acc/<class>``). Rewritten from metrics.jsonl after every epoch, so
    a resumed run's file is its metrics.jsonl's, never a row twice."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        if (run_dir / "metrics.jsonl").exists():  # a resumed run: its epochs so far, now
            self.log_epoch({})

    def log_scalars(self, global_step: int, scalars: dict[str, float]) -> None:
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


def open_trackers(run_dir: Path, logger: LoggerConfig) -> list[Tracker]:
    """The stores ``logger`` turns on, for the run in ``run_dir`` (rank 0's)."""
    trackers: list[Tracker] = []
    if logger.csv:
        trackers.append(CsvTracker(run_dir))
    return trackers
