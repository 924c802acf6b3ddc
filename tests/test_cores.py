"""One home for how many cores a process may use: its affinity, OMP_NUM_THREADS (which Ray sets to a task's CPUs),
and what the loader workers, onnxruntime threads and decode pools take from it."""

import os

import pytest

from pipeline.core.cores import usable_cores
from pipeline.training.loader import auto_workers


@pytest.fixture
def cores(monkeypatch):
    def given(affinity: int, omp: str | None = None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)

    return given


def test_the_affinity_and_omp_num_threads_cap_the_cores(cores):
    cores(16)
    assert usable_cores() == 16 and auto_workers(-1) == 8
    cores(2)  # taskset -c 0,1 on a big machine, or a container's cpuset
    assert usable_cores() == 2 and auto_workers(-1) == 0
    cores(16, "4")  # a Ray job given 4 CPUs
    assert usable_cores() == 4 and auto_workers(-1) == 3
    cores(16, "1")
    assert usable_cores() == 1 and auto_workers(-1) == 0
    cores(4, "bogus")
    assert usable_cores() == 4
    assert auto_workers(5) == 5  # asked for: as asked


def test_a_ray_job_uses_the_cpus_it_was_given():
    """worker_threads, which every Ray job and Tune trial calls first: its torch threads and every pool follow
    ray.cpus_per_job, not the machine (a subprocess: it sets the process's own environment)."""
    import subprocess
    import sys

    code = (
        "import os; os.sched_getaffinity = lambda pid: set(range(16)); import torch; "
        "from pipeline.core.config import Config; from pipeline.orchestration.jobs import worker_threads; "
        "from pipeline.core.cores import usable_cores; from pipeline.training.loader import auto_workers; "
        "cfg = Config(); cfg.ray.cpus_per_job = 3; worker_threads(cfg); "
        "print(torch.get_num_threads(), usable_cores(), auto_workers(-1))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["3", "3", "2"]
