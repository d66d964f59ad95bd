"""Write a file so that readers see the old content or the new, never half of either.

Several processes may write one path at once (a sweep's jobs preparing the same
dataset, the ranks of a distributed run): each writes its own temporary file, named
after its host and process, and the last rename wins. A temporary file is removed by
another writer only when its own writer is gone: a dead process on this host, or, from
another host (a shared file system), untouched for STALE_AFTER_S.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file in ``path``'s folder; on success fsync it and rename it over
    ``path`` (atomic on POSIX), on any failure delete it and leave ``path`` untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    writer = f"{host_name()}.{os.getpid()}"
    handle, partial = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{writer}.", suffix=".partial"
    )
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)  # make the rename itself durable


STALE_AFTER_S = 3600.0  # another host's temporary file this old has lost its writer


def remove_stale_partials(path: Path) -> None:
    """Delete temporary files of ``path`` whose writer was killed; never a live one's."""
    for partial in path.parent.glob(f".{path.name}.*.partial"):
        parts = partial.name[len(path.name) + 2 :].split(".")
        host, pid = (parts[0], parts[1]) if len(parts) >= 3 else ("", "")
        if host == host_name() and pid.isdigit():
            stale = not process_alive(int(pid))
        else:  # another host's (or an older stable-cnn's unnamed) file: judge by its age
            try:
                stale = time.time() - partial.stat().st_mtime > STALE_AFTER_S
            except FileNotFoundError:
                continue  # its writer just renamed or removed it
        if stale:
            partial.unlink(missing_ok=True)


def host_name() -> str:
    # dots would split the name's fields; a host name has no other meaning here
    return socket.gethostname().replace(".", "-") or "host"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on this platform
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
