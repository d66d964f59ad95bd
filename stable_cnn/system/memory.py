"""How much memory this job may still take: the host's, within the limits of its control
group (SLURM's --mem, a container's limit), and a GPU's. In-memory decisions are sized
by these, not by the host's total."""

from __future__ import annotations

from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def available_memory(
    meminfo: Path = Path("/proc/meminfo"),
    cgroups: Path = Path("/proc/self/cgroup"),
    cgroup_root: Path = CGROUP_ROOT,
) -> int | None:
    """Bytes this process may still allocate: the host's MemAvailable (free memory plus
    what the page cache would give back), or less where a memory cgroup (v1 or v2, this
    process's or one above it) has less left under its limit; None where neither can be
    read."""
    amounts = [host_available(meminfo), cgroup_available(cgroups, cgroup_root)]
    amounts = [amount for amount in amounts if amount is not None]
    return min(amounts) if amounts else None


def host_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_available(cgroups: Path, cgroup_root: Path) -> int | None:
    """The least that any memory cgroup of this process, or above it, has left under its
    limit; None without a limit (or where none can be read)."""
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:  # "4:memory:/slurm/uid_0/job_7" (v1), "0::/user.slice/..." (v2)
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy; limits in memory.max
            folder, names = cgroup_root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            folder = cgroup_root / "memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        group = folder / path.lstrip("/")
        for level in (group, *group.parents):  # a limit on a parent binds its children
            if not level.is_relative_to(folder):
                break
            remaining = limit_left(level, *names)
            if remaining is not None:
                left.append(remaining)
    return min(left) if left else None


def limit_left(group: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    """Limit minus usage of one cgroup, less the page cache the kernel would reclaim
    (memory.stat's inactive files, as kubelet's working set counts it); None where it
    has no limit or cannot be read."""
    try:
        limit = (group / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= UNLIMITED:
            return None
        used = int((group / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    return max(0, int(limit) - max(0, used - reclaimable(group / "memory.stat", cache_key)))


def reclaimable(stat_file: Path, key: str) -> int:
    """The bytes memory.stat gives for ``key`` (0 where it cannot be read)."""
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def device_memory_available(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None for the CPU and other devices: the host's
    memory is counted by available_memory)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)
