"""How many CPUs this process may use: its affinity, capped by its cgroup's CPU quota.

``os.cpu_count()`` counts the machine's CPUs, not the ones a container or a ``taskset``
leaves this process; a server sized by it starts far more processes than it can keep busy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``), capped by the cgroup v2
    ``cpu.max`` or v1 CFS quota of its cgroup and of every cgroup above it; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(Path(cgroup_root), Path(proc_cgroup))
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def cgroup_cpu_quota(cgroup_root: Path, proc_cgroup: Path) -> int | None:
    """The CPU quota of this process's cgroups in whole CPUs (rounded up), or None when
    there is none (or no cgroup file system to read)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        relative = path.strip().lstrip("/")
        if controllers == "":  # cgroup v2: "0::/path"
            limits += _limits(cgroup_root, relative, _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            mount = cgroup_root / controllers
            if not mount.is_dir():
                mount = cgroup_root / "cpu"
            limits += _limits(mount, relative, _v1_limit)
    return math.ceil(min(limits)) if limits else None


def _limits(mount: Path, relative: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits ``read`` finds in the cgroup ``relative`` under ``mount`` and in each of its
    ancestors. In a container the cgroup's own directory is often the mount itself, so
    the mount's top counts too."""
    found: list[float] = []
    parts = [p for p in relative.split("/") if p]
    for depth in range(len(parts), -1, -1):
        limit = read(mount.joinpath(*parts[:depth]))
        if limit is not None:
            found.append(limit)
    return found


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return _ratio(int(quota), int(period))
    except ValueError:
        return None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    """CPUs a quota of ``quota`` per ``period`` microseconds gives; None for no limit (-1)."""
    if quota <= 0 or period <= 0:
        return None
    return quota / period
