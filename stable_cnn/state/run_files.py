"""The files of a run folder besides its checkpoints, read back: whether the folder holds a
run, how the run ended (results.json, failure.json) and its epochs (metrics.jsonl).
Resume, the report and the commands ask these; the tracker writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stable_cnn.errors import ConfigError
from stable_cnn.system.atomic import atomic_write

FAILURE_FILE = "failure.json"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "results.json").is_file()


def has_diverged(run_dir: Path) -> bool:
    """failure.json says the run diverged: the same config would diverge again."""
    failure = read_failure(run_dir)
    return failure is not None and failure["status"] == "diverged"


def was_pruned(run_dir: Path) -> bool:
    """failure.json says a search's pruner stopped the run (on purpose)."""
    failure = read_failure(run_dir)
    return failure is not None and failure["status"] == "pruned"


# What a run that trained leaves in its folder (besides Hydra's .hydra/ and train.log).
TRAINED = ("checkpoints", "metrics.jsonl", "results.json")


def holds_a_run(run_dir: Path) -> bool:
    """A run trained in this folder: it can be continued, not started again."""
    return any((run_dir / name).exists() for name in TRAINED)


def holds_a_record(run_dir: Path) -> bool:
    """The folder records a training run: one that trained, or a sweep's job that was
    refused and says why in failure.json (a refused command alone leaves no folder)."""
    return holds_a_run(run_dir) or (run_dir / FAILURE_FILE).is_file()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of per-epoch records ([] when the run logged no epoch)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # blank, or cut short by a kill while appending
            continue
    return records


def record_failure(run_dir: Path, status: str, reason: str, message: str) -> None:
    """failure.json: why the run ended without results (read by stable-cnn-report).
    ``status`` is ``diverged`` (numbers went non-finite) or ``interrupted`` (a signal);
    ``reason`` is a few words for tables, ``message`` the full line that was logged."""
    record = {"status": status, "reason": reason, "message": message}
    with atomic_write(run_dir / FAILURE_FILE) as out:
        out.write((json.dumps(record, indent=2) + "\n").encode())


def read_failure(run_dir: Path) -> dict[str, str] | None:
    path = run_dir / FAILURE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_path(given: str | None) -> Path:
    """``checkpoint=...`` as a path: a .pt file, or a run folder (its checkpoints/best.pt)."""
    if given is None:
        raise ConfigError("checkpoint=... is required: the path of a .pt file or run folder")
    path = Path(given).expanduser()
    return path / "checkpoints" / "best.pt" if path.is_dir() else path


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/best.pt`` -> ``<run>``),
    or the folder holding it: where the commands that read a run write by default."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder
