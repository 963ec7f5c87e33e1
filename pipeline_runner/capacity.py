"""Whether this host can run the workers a deployment asks of it.

``runner deploy`` refuses (unless ``--allow-oversubscribe``) and ``runner validate`` warns when the
workers this host would run exceed any of:

- **CPUs:** more than the larger of :data:`MIN_WORKER_BOUND` and :data:`WORKERS_PER_CPU` per CPU.
  Workers mostly wait on I/O, so several per CPU are normal (the tests run six on two CPUs), but
  past this point they only compete for the CPUs and the deployment takes minutes to start.
- **Memory:** their estimated memory (:data:`WORKER_MEMORY_BYTES` each, plus
  :data:`TRITON_SERVER_MEMORY_BYTES` for the Triton server each Triton worker starts) above the
  memory available now.
- **Open files:** the embedded nats-server holds a connection per worker, within the open-file
  limit (``ulimit -n``) it inherits from ``runner deploy``.
- **Processes:** their threads (``ulimit -u`` counts threads) above the user's process limit.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .config import DeploymentConfig
from .preflight import Problem

MIN_WORKER_BOUND = 64
WORKERS_PER_CPU = 16
#: A hello_world worker (NumPy, nats-py, UCX) measured 73 MiB RSS; the rest is room for requests.
WORKER_MEMORY_BYTES = 128 << 20
#: A tritonserver and its Python backend stub measured 77 MiB RSS with hello_world's models;
#: models add their weights.
TRITON_SERVER_MEMORY_BYTES = 256 << 20
#: A Python worker runs 4 threads (measured); a Triton worker 11, its tritonserver 60, the stub 5.
THREADS_PER_WORKER = 8
THREADS_PER_TRITON_SERVER = 72
#: Open files of the embedded nats-server: a connection per worker (measured 1), its own few.
NATS_FILES_PER_WORKER = 2
NATS_BASE_FILES = 64


@dataclass(frozen=True)
class HostResources:
    """What this host offers workers; None where there is no limit or it cannot be read."""

    cpus: int
    available_memory_bytes: int | None
    open_files_limit: int | None
    threads_limit: int | None

    @classmethod
    def probe(cls) -> HostResources:
        """The CPUs this process may run on, available memory (cgroup included) and its rlimits."""
        cpus = _affinity_cpus()
        threads = _soft_limit(resource.RLIMIT_NPROC)
        if os.geteuid() == 0:
            threads = None  # RLIMIT_NPROC does not hold for root
        return cls(cpus, _available_memory(), _soft_limit(resource.RLIMIT_NOFILE), threads)


@dataclass(frozen=True)
class HostShare:
    """What of a deployment runs on this host (``runner deploy --only``, ``--workers``)."""

    only: Sequence[str] | None = None
    workers: int | None = None

    def workers_here(self, config: DeploymentConfig) -> dict[int, int]:
        """Workers this host runs, by operator index."""
        return {
            index: self.workers or op.workers
            for index, op in enumerate(config.operators)
            if self.only is None or op.name in self.only
        }


def capacity_problems(
    config: DeploymentConfig, share: HostShare = HostShare(), host: HostResources | None = None
) -> list[Problem]:
    """Each limit of this host that the workers it would run exceed, at the largest operator's workers."""
    counts = share.workers_here(config)
    if not counts:
        return []
    host = host or HostResources.probe()
    workers = sum(counts.values())
    triton = sum(n for index, n in counts.items() if config.operators[index].kind == "triton")
    largest = max(counts, key=lambda index: counts[index])
    loc = ("operators", largest, "workers")
    listed = ", ".join(f"{config.operators[i].name}×{n}" for i, n in sorted(counts.items(), key=lambda c: -c[1])[:3])
    what = f"{workers} workers on this host ({listed}{', ...' if len(counts) > 3 else ''})"
    problems = []
    bound = max(MIN_WORKER_BOUND, WORKERS_PER_CPU * host.cpus)
    if workers > bound:
        problems.append(Problem(loc, (
            f"{what} exceed its bound of {bound} (the larger of {MIN_WORKER_BOUND} and "
            f"{WORKERS_PER_CPU} per CPU, {host.cpus} CPUs)"
        )))  # fmt: skip
    memory = workers * WORKER_MEMORY_BYTES + triton * TRITON_SERVER_MEMORY_BYTES
    if host.available_memory_bytes is not None and memory > host.available_memory_bytes:
        triton_part = f" and {TRITON_SERVER_MEMORY_BYTES >> 20} MiB per Triton server" if triton else ""
        problems.append(Problem(loc, (
            f"{what} need about {_mib(memory)} of memory ({WORKER_MEMORY_BYTES >> 20} MiB each{triton_part}), "
            f"more than the {_mib(host.available_memory_bytes)} available"
        )))  # fmt: skip
    files = NATS_BASE_FILES + NATS_FILES_PER_WORKER * workers
    if config.request_plane.nats_url is None and host.open_files_limit is not None and files > host.open_files_limit:
        problems.append(Problem(loc, (
            f"{what} need about {files} open files in the embedded nats-server, more than the "
            f"open-file limit of {host.open_files_limit} (ulimit -n)"
        )))  # fmt: skip
    threads = workers * THREADS_PER_WORKER + triton * THREADS_PER_TRITON_SERVER
    if host.threads_limit is not None and threads > host.threads_limit:
        problems.append(Problem(loc, (
            f"{what} need about {threads} threads, more than the process limit of "
            f"{host.threads_limit} (ulimit -u)"
        )))  # fmt: skip
    return problems


#: Most bytes one request may declare by default (``max_request_bytes``), on hosts of 8 GiB and more.
DEFAULT_MAX_REQUEST_BYTES = 1 << 30


@cache
def default_max_request_bytes() -> int:
    """An operator's default ``max_request_bytes``: 1 GiB, or an eighth of this host's memory if less."""
    total = _total_memory()
    return DEFAULT_MAX_REQUEST_BYTES if total is None else min(DEFAULT_MAX_REQUEST_BYTES, total // 8)


def _mib(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB"


def _soft_limit(which: int) -> int | None:
    soft, _ = resource.getrlimit(which)
    return None if soft == resource.RLIM_INFINITY else soft


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _total_memory() -> int | None:
    total = _meminfo("MemTotal")
    limit = _cgroup_file("memory.max")
    if limit is not None and limit.isdigit():
        total = int(limit) if total is None else min(total, int(limit))
    return total


def _affinity_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup's CPU limit (a container's)."""
    cpus = _affinity_cpus()
    limit = cgroup_cpu_limit(_cgroup_file("cpu.max"), *_cgroup_v1_cfs())
    return max(1, min(cpus, math.ceil(limit))) if limit is not None else cpus


def cgroup_cpu_limit(cpu_max: str | None, cfs_quota_us: str | None, cfs_period_us: str | None) -> float | None:
    """A CPU limit in CPUs from cgroup v2's ``cpu.max`` or, without it, v1's CFS quota and period;
    None where there is no limit (or it cannot be read)."""
    try:
        if cpu_max is not None:
            quota, _, period = cpu_max.partition(" ")
            return None if quota == "max" else int(quota) / int(period)
        if cfs_quota_us is not None and cfs_period_us is not None:
            quota_us = int(cfs_quota_us)
            return None if quota_us <= 0 else quota_us / int(cfs_period_us)
    except (ValueError, ZeroDivisionError):
        pass
    return None


def _cgroup_v1_cfs() -> tuple[str | None, str | None]:
    """cgroup v1's CFS quota and period as mounted for this process (a container sees its own)."""
    root = Path("/sys/fs/cgroup/cpu")
    try:
        return (root / "cpu.cfs_quota_us").read_text().strip(), (root / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None, None


def _cgroup_file(name: str) -> str | None:
    """A file of this process's cgroup (v2), stripped; None where there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        relative = next(line[3:] for line in lines if line.startswith("0::"))
        return (Path("/sys/fs/cgroup") / relative.lstrip("/") / name).read_text().strip()
    except (OSError, StopIteration):
        return None


def _available_memory() -> int | None:
    """MemAvailable, or less where this process's cgroup (v2) allows less."""
    available = _meminfo("MemAvailable")
    cgroup = _cgroup_memory_left()
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


def _cgroup_memory_left() -> int | None:
    """What this process's cgroup v2 memory limit leaves, page cache it can drop counted as free."""
    limit, current, stat = (_cgroup_file(name) for name in ("memory.max", "memory.current", "memory.stat"))
    if limit is None or current is None or not limit.isdigit():
        return None  # no cgroup v2, or no limit ("max")
    try:
        used = int(current)
        for line in (stat or "").splitlines():
            if line.startswith("inactive_file "):
                used -= int(line.split()[1])
    except ValueError:
        return None
    return max(int(limit) - used, 0)
