"""Several processes writing one file: every write succeeds, readers always see a whole
version, and only dead writers' temporary files are cleaned up."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from stable_cnn.system.atomic import STALE_AFTER_S, atomic_write, host_name

WRITER = """
import hashlib, sys
from pathlib import Path
from stable_cnn.system.atomic import STALE_AFTER_S, host_name, atomic_write
path, writer = Path(sys.argv[1]), int(sys.argv[2])
for version in range(40):
    body = bytes([writer, version]) * (5000 + 3000 * ((writer + version) % 7))
    with atomic_write(path) as out:
        out.write(hashlib.sha256(body).digest() + body)
"""


def is_whole(content: bytes) -> bool:
    return len(content) > 32 and hashlib.sha256(content[32:]).digest() == content[:32]


def test_concurrent_writers_all_succeed_and_readers_see_whole_versions(tmp_path: Path):
    path = tmp_path / "data" / "train-images"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(k)], stderr=subprocess.PIPE, text=True
        )
        for k in range(4)
    ]
    reads = 0
    while any(w.poll() is None for w in writers):
        if path.exists():
            assert is_whole(path.read_bytes()), "a reader saw a half-written file"
            reads += 1
    errors = [w.stderr.read() for w in writers]
    assert [w.returncode for w in writers] == [0, 0, 0, 0], errors
    assert is_whole(path.read_bytes()) and reads > 0
    assert [p.name for p in path.parent.iterdir()] == ["train-images"], "no temporary left"


def test_only_dead_writers_temporaries_are_removed(tmp_path: Path):
    path = tmp_path / "file"
    live = tmp_path / f".file.{host_name()}.{os.getpid()}.abc.partial"  # this very process
    dead_process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    dead = tmp_path / f".file.{host_name()}.{dead_process}.abc.partial"
    other_host_fresh = tmp_path / ".file.elsewhere.123.abc.partial"
    other_host_old = tmp_path / ".file.elsewhere.456.abc.partial"
    for partial in (live, dead, other_host_fresh, other_host_old):
        partial.write_bytes(b"half")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(other_host_old, (old, old))

    with atomic_write(path) as out:
        out.write(b"whole")

    assert path.read_bytes() == b"whole"
    assert live.exists() and other_host_fresh.exists(), "a live writer's file is kept"
    assert not dead.exists() and not other_host_old.exists(), "stale files are removed"
