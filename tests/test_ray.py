"""launcher=ray on a real multi-node Ray cluster started here: a head and two single-CPU worker nodes, each its
own raylet, all on 127.0.0.1. The CLI joins it with ray.address=HOST:PORT like a user joining a cluster."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, cli_command, cli_env, wait_for, write_config

from pipeline.orchestration.launch import LOCAL_RAY_ENV, SCRATCH, system_processes_env

os.environ.update(LOCAL_RAY_ENV)  # before ray is imported: node addresses stay on loopback
PHASES = [{"epochs": 3, "train": "all", "lr": 0.003}]  # 3 epochs: room to kill a job mid-fold
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the local reference uses the thread count of a ray job (cpus_per_job=1)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")


class SocketWatch:
    """Polls `ss` while the cluster works: every TCP/UDP socket of this test's processes (the cluster's raylets,
    workers, GCS, the CLI driver) must be bound to and connected to loopback addresses only. `exempt(line)` names
    lines known to carry no traffic."""

    def __init__(self, exempt=lambda line: False):
        self.exempt = exempt
        self.bad: set[str] = set()
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self):
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(0.5)

    def check_once(self):
        ours = descendants(os.getpid())
        out = subprocess.run(["ss", "-tuanpH"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            if not pids & ours:
                continue
            cols = line.split()
            state, local, peer = cols[1], cols[4], cols[5]
            self.seen += 1
            if not is_loopback(local) or (state not in ("LISTEN", "UNCONN") and not is_loopback(peer)):
                if not self.exempt(line):
                    self.bad.add(line)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    with system_processes_env():
        c = Cluster(
            initialize_head=True,
            head_node_args={"node_ip_address": "127.0.0.1", "include_dashboard": False, "num_cpus": 0},
        )
        workers = [c.add_node(node_ip_address="127.0.0.1", num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
    watch = SocketWatch().__enter__()
    c.watch, c.workers = watch, workers
    yield c
    watch.__exit__(None, None, None)
    c.shutdown()  # only this cluster: its own processes


@pytest.fixture(scope="module")
def local_submission(demo_root, tmp_path_factory) -> bytes:
    """The reference: launcher=local on one thread."""
    d = tmp_path_factory.mktemp("local")
    cfg = write_config(d / "c.yaml", data={"root": demo_root}, models=[model()])
    r = cli("run", cfg, cwd=d, env=ONE_THREAD)
    assert r.returncode == 0, r.stdout + r.stderr
    return submission(d)


def model() -> dict:
    return {"name": "scratch_cnn", "pretrained": False, "phases": PHASES}


def submission(d: Path) -> bytes:
    (path,) = (d / "submissions").glob("*.csv")
    return path.read_bytes()


def ray_config(d: Path, demo_root, cluster, epochs: int | None = None) -> list[str]:
    """The test config on the cluster; `epochs`: one long phase instead (a job still running when interrupted)."""
    m = model() if epochs is None else {**model(), "phases": [{"epochs": epochs, "train": "all", "lr": 0.003}]}
    cfg = write_config(d / "c.yaml", data={"root": demo_root}, models=[m])
    return [cfg, "launcher=ray", f"ray.address={cluster.address}"]


def done_lines(stdout: str) -> dict[int, str]:
    """fold -> node of the progress lines 'scratch_cnn fold K: done on node IP/ID in ...'."""
    return {int(k): node for k, node in re.findall(r"^scratch_cnn fold (\d): done on node (\S+) in ", stdout, re.M)}


@pytest.fixture(scope="module")
def ray_run(cluster, demo_root, tmp_path_factory):
    """The demo config with launcher=ray on the cluster: (its folder, the finished CLI call)."""
    d = tmp_path_factory.mktemp("ray")
    return d, cli("run", *ray_config(d, demo_root, cluster), cwd=d)


def test_ray_jobs_on_two_nodes_match_local(cluster, ray_run, local_submission):
    d, r = ray_run
    assert r.returncode == 0, r.stdout + r.stderr
    nodes = done_lines(r.stdout)
    assert sorted(nodes) == [0, 1] and len(set(nodes.values())) == 2, r.stdout  # two distinct worker nodes
    assert re.search(r"fold 0: done on node 127\.0\.0\.1/\w+ in [\d.]+s, OOF score 0\.\d{4}", r.stdout)
    assert submission(d) == local_submission
    assert (d / "runs/exp/scratch_cnn/.fold0.lock").is_file()  # shared fs: the job wrote here itself
    cluster.watch.check_once()
    assert cluster.watch.seen > 0 and not cluster.watch.bad, cluster.watch.bad


def worker_pid(cluster, task_name: str) -> int | None:
    """The worker process running `task_name` (Ray titles it ray::NAME), among this cluster's raylets' children."""
    raylets = {n.all_processes["raylet"][0].process.pid for n in cluster.workers}
    kids = _children()
    for pid in (p for r in raylets for p in kids.get(r, [])):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{task_name}".encode()):
                return pid
        except OSError:
            pass
    return None


def _default_sigint() -> None:
    # A job started in the background by a non-interactive shell (as CI may start the suite) inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt: give the driver the terminal's default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def test_killed_worker_is_retried_and_resumes(cluster, local_submission, demo_root, workdir):
    p = start(["run", *ray_config(workdir, demo_root, cluster)], workdir)
    last = workdir / "runs/exp/scratch_cnn/fold0/last.pt"
    wait_for(last.is_file)  # fold 0 finished an epoch and is in the next one
    os.kill(wait_for(lambda: worker_pid(cluster, "scratch_cnn-fold0"), timeout=10), signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    assert re.search(r"^scratch_cnn fold 0: done on node .* \(retried: resumed after epoch [12]\)$", out, re.M), out
    assert submission(workdir) == local_submission


def test_no_shared_fs_sends_fold_files_to_the_driver(cluster, local_submission, demo_root, workdir):
    r = cli("run", *ray_config(workdir, demo_root, cluster), "ray.shared_fs=false", cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(done_lines(r.stdout)) == [0, 1]
    fold = workdir / "runs/exp/scratch_cnn/fold0"
    for name in ("best.pt", "metrics.csv", "oof.csv", "test.csv", "train_done.json", "predict_done.json"):
        assert (fold / name).is_file(), name
    assert not (fold.parent / ".fold0.lock").exists()  # the job never touched the driver's runs/
    assert not any(SCRATCH.glob("exp-*/scratch_cnn/fold*"))  # the job's scratch folder is gone
    assert submission(workdir) == local_submission


def test_failing_job_one_line_no_retry_other_folds_kept(cluster, ray_run, demo_root, workdir):
    args = ray_config(workdir, demo_root, cluster)
    (good,) = (ray_run[0] / "folds").glob("*.csv")
    folds = pd.read_csv(good, dtype={"id": str})
    folds.loc[folds.fold == 1, "fold"] = 2  # corrupt: fold 1 has no validation rows left
    (workdir / "folds").mkdir()
    folds.to_csv(workdir / "folds" / good.name, index=False)
    t0 = time.monotonic()
    r = cli("run", *args, cwd=workdir)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: scratch_cnn fold")]
    assert errors == [
        "error: scratch_cnn fold 1: fold 1 has 90 training and 0 validation images left (unreadable images "
        "skipped?); use fewer folds or fix the images"
    ], r.stderr
    assert "1 job(s) failed (scratch_cnn-fold1)" in r.stderr
    assert (workdir / "runs/exp/scratch_cnn/fold0/predict_done.json").is_file()  # the other fold is kept
    assert not (workdir / "submissions").exists()
    assert time.monotonic() - t0 < 120


def test_ctrl_c_cancels_jobs_and_leaves_nothing_half_written(cluster, demo_root, workdir):
    p = start(["run", *ray_config(workdir, demo_root, cluster, epochs=200)], workdir)  # ~1 min of work per job
    wait_for((workdir / "runs/exp/scratch_cnn/fold0/last.pt").is_file)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    wait_for(lambda: not worker_pid(cluster, "scratch_cnn-fold0") and not worker_pid(cluster, "scratch_cnn-fold1"), 30)
    runs = workdir / "runs/exp"
    assert not [p for p in runs.rglob(".*.tmp*")]  # no temporary left behind
    assert not (workdir / "submissions").exists()
    for fold in runs.glob("scratch_cnn/fold*"):  # whatever was written is whole
        if (fold / "metrics.csv").is_file():
            assert len(pd.read_csv(fold / "metrics.csv")) >= 1


def test_every_ray_socket_stayed_on_loopback(cluster):
    """Checked last, after all the runs above: nothing was bound to or talked to a non-loopback address."""
    cluster.watch.check_once()
    assert cluster.watch.seen > 0 and not cluster.watch.bad, cluster.watch.bad


def test_unreachable_or_malformed_address_is_refused_at_once():
    from pipeline.core.errors import PipelineError
    from pipeline.orchestration.launch import check_reachable

    with pytest.raises(PipelineError, match="no Ray head node answers there"):
        check_reachable("127.0.0.1:1")
    with pytest.raises(PipelineError, match='use "" \\(start Ray here\\), auto, or HOST:PORT'):
        check_reachable("nonsense")
