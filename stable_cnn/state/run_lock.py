"""One live writer per run folder: ``run.lock``, held with an exclusive ``flock`` for as
long as the run writes, and naming the host and process that holds it.

``trainer.resume=auto`` must never adopt a run that a live process is still writing
(two runs started at once with the same config would otherwise train into one folder).
The kernel releases a process's flock when it dies, however it dies (kill -9, a node
lost to a requeued SLURM job), so a lock is live exactly while its file is flocked: no
guessing from pids or ages. (On a shared file system the lock is as good as its flock
support: NFSv4 and Lustre have it.)
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from stable_cnn.errors import UserError
from stable_cnn.system.atomic import host_name

LOCK_FILE = "run.lock"
# A look at a lock (``lock_holder``) holds it shared for an instant: a process taking it
# tries for this long before it concludes that a live run holds it.
TAKE_TRIES, TAKE_PAUSE_S = 20, 0.05


def lock_holder(run_dir: Path) -> dict[str, object] | None:
    """Who holds ``run_dir``'s lock (host and pid, as it wrote them) while that process
    lives; None when the folder is free."""
    path = run_dir / LOCK_FILE
    try:
        handle = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _record(path)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None  # a lock file whose process is gone
    finally:
        os.close(handle)


def _record(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # being written this instant
        return {"host": "?", "pid": "?"}


def _same_file(handle: int, path: Path) -> bool:
    try:
        return os.fstat(handle).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def describe_holder(holder: dict[str, object]) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')}"


class RunLock:
    """A run folder's lock: ``acquire_for`` raises a UserError naming the live holder."""

    def __init__(self) -> None:
        self.path = Path(LOCK_FILE)
        self.handle: int | None = None

    def acquire_for(self, run_dir: Path) -> RunLock:
        self.path = run_dir / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(TAKE_TRIES):
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                time.sleep(TAKE_PAUSE_S)
                continue
            if _same_file(handle, self.path):
                break
            os.close(handle)  # its holder removed that file as we took it: take the new one
        else:
            holder = _record(self.path)
            raise UserError(
                f"run folder {self.path.parent} is being written by {describe_holder(holder)}:"
                f" wait for it to finish, or choose another hydra.run.dir"
            )
        record = {"host": host_name(), "pid": os.getpid()}
        os.ftruncate(handle, 0)
        os.pwrite(handle, (json.dumps(record) + "\n").encode(), 0)
        self.handle = handle
        return self

    def release(self) -> None:
        """Remove the lock file and let it go (the process's exit would, too)."""
        if self.handle is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.handle)  # closing the last descriptor releases the flock
        self.handle = None
