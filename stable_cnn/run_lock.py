"""One live writer per run folder: a lock file naming the host and process that writes it.

``trainer.resume=auto`` must never adopt a run that a live process is still writing
(two runs started at once with the same config would otherwise train into one folder).
A lock is stale, and taken over, when its process is gone: a dead process on this
host, or the same SLURM job (a requeued job finds its own earlier lock). A lock of
another host is taken as live: only that host can tell, and the message says how to
clear it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import TracebackType

from stable_cnn.atomic import host_name, process_alive
from stable_cnn.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


def lock_holder(run_dir: Path) -> dict[str, object] | None:
    """Who holds ``run_dir``'s lock, if that process may still be alive; None when the
    folder is free or its lock is stale."""
    try:
        holder = json.loads((run_dir / LOCK_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None  # no lock, or one torn by a kill while it was written: no live writer
    job = os.environ.get("SLURM_JOB_ID")
    if job is not None and holder.get("slurm_job_id") == job:
        return None  # this very SLURM job, requeued: its earlier process is gone
    if holder.get("host") == host_name():
        pid = holder.get("pid")
        return holder if isinstance(pid, int) and process_alive(pid) else None
    return holder


def describe_holder(holder: dict[str, object]) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')}"


class RunLock:
    """Hold ``run_dir``'s lock for the life of a ``with`` block."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE

    def __enter__(self) -> RunLock:
        record = {"host": host_name(), "pid": os.getpid(),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try when another process took the lock meanwhile
            holder = lock_holder(self.path.parent)
            if holder is not None:
                raise UserError(
                    f"run folder {self.path.parent} is being written by "
                    f"{describe_holder(holder)}: wait for it to finish, or choose another "
                    f"hydra.run.dir (if that process is gone, delete {self.path})"
                )
            self.path.unlink(missing_ok=True)  # a stale lock
            try:  # O_EXCL: of two processes starting at once, one wins
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(handle, "w") as out:
                out.write(json.dumps(record) + "\n")
            return self
        raise UserError(f"could not lock run folder {self.path.parent}: try again")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == host_name():
            self.path.unlink(missing_ok=True)
