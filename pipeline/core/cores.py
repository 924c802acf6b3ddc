"""How many CPU cores this process may use: the one home of that rule, for loader workers, decode and detection
pools and onnxruntime threads."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity: taskset, a container's cpuset), capped by OMP_NUM_THREADS
    when it is set (Ray sets it to the CPUs it gave a task, so a Ray job uses its share, not the whole machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        cores = min(cores, int(omp))
    return max(1, cores)


def cores_per_job(jobs: int) -> int:
    """The cores each of `jobs` jobs running at once on this machine gets: its torch threads, and (through
    OMP_NUM_THREADS in its process) its loader workers and pools."""
    return max(1, usable_cores() // jobs)
