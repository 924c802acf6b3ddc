"""launcher=ray against launcher=local on the demo config (2 backbones x 3 folds = 6 jobs), each a fresh CLI run.

    .venv/bin/python benchmarks/scale.py [--config configs/demo.yaml] [--out /tmp/scale]

1. local, default torch threads                      (what ./run.sh does)
2. local, OMP_NUM_THREADS=1                          (the thread count of a ray job with ray.cpus_per_job=1)
3. ray, one single-CPU worker node: jobs in series   (3 - 2) / jobs = Ray's overhead per job
4. ray, two single-CPU worker nodes: two jobs at once (4 / 1 = the headline ratio, target <= 1.1)
5. ray started by the run itself on this machine     (what ./run.sh CONFIG launcher=ray does: 4 + Ray's start)

The clusters are real Ray clusters on 127.0.0.1 (head without CPUs + worker raylets), started here and shut
down here. Runs 2-4 must give the same submission byte for byte; the script checks it. Prints the load average
before and after: timings taken while other work runs are not worth much.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.orchestration.launch import LOCAL_RAY_ENV, system_processes_env  # noqa: E402

os.environ.update(LOCAL_RAY_ENV)  # before ray is imported


def cli(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, str]:
    """Run `python -m pipeline ARGS` in `cwd`; (wall seconds, stdout)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall, r.stdout


def submission_hash(cwd: Path) -> str:
    (path,) = (cwd / "submissions").glob("*.csv")
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def fresh(out: Path, name: str, config: Path) -> Path:
    """An empty run folder whose runs/demo-data and runs/cache are the shared, already built ones."""
    d = out / name
    shutil.rmtree(d, ignore_errors=True)
    (d / "runs").mkdir(parents=True)
    for shared in ("demo-data", "cache"):
        (d / "runs" / shared).symlink_to(out / shared)
    shutil.copy(config, d / "config.yaml")
    return d


def warm_up(out: Path, config: Path) -> None:
    """The demo data and every model's image cache, built once before anything is timed."""
    from pipeline.core.config import load_config
    from pipeline.data.cache import prepare_images
    from pipeline.data.competition import load_competition
    from pipeline.data.demo import make_demo

    make_demo(out / "demo-data")
    (out / "cache").mkdir(exist_ok=True)
    d = fresh(out, "warm", config)
    os.chdir(d)
    cfg = load_config("config.yaml", ["data.root=runs/demo-data", "data.name=demo"])  # as run() resolves "demo"
    comp = load_competition(cfg)
    for m in cfg.models:
        comp, _ = prepare_images(comp, cfg, cfg.img_size(m))
    os.chdir(out)


def ray_run(out: Path, name: str, config: Path, workers: int) -> tuple[float, str, str]:
    from ray.cluster_utils import Cluster

    with system_processes_env():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"node_ip_address": "127.0.0.1", "include_dashboard": False, "num_cpus": 0},
        )
        for _ in range(workers):
            cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1)
        cluster.wait_for_nodes()
    try:
        d = fresh(out, name, config)
        wall, stdout = cli(["run", "config.yaml", "launcher=ray", f"ray.address={cluster.address}"], d)
        return wall, stdout, submission_hash(d)
    finally:
        cluster.shutdown()


def job_seconds(stdout: str) -> list[float]:
    return [float(s) for s in re.findall(r": done on node \S+ in ([\d.]+)s", stdout)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    ap.add_argument("--out", default="/tmp/pipeline-scale")
    args = ap.parse_args()
    out, config = Path(args.out), Path(args.config).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")

    warm_up(out, config)

    walls, hashes = {}, {}
    for name, env in (("local", {}), ("local-1thread", {"OMP_NUM_THREADS": "1"})):
        d = fresh(out, name, config)
        walls[name], _ = cli(["run", "config.yaml"], d, env)
        hashes[name] = submission_hash(d)
        print(f"{name:<16} {walls[name]:6.1f}s  submission {hashes[name]}", flush=True)
    per_job = {}
    for name, workers in (("ray-1node", 1), ("ray-2nodes", 2)):
        walls[name], stdout, hashes[name] = ray_run(out, name, config, workers)
        per_job[name] = job_seconds(stdout)
        print(f"{name:<16} {walls[name]:6.1f}s  submission {hashes[name]}  jobs {per_job[name]}", flush=True)

    d = fresh(out, "ray-here", config)
    walls["ray-here"], _ = cli(["run", "config.yaml", "launcher=ray"], d)
    hashes["ray-here"] = submission_hash(d)
    print(f"{'ray-here':<16} {walls['ray-here']:6.1f}s  submission {hashes['ray-here']}", flush=True)

    jobs = len(per_job["ray-1node"])
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(f"jobs: {jobs}")
    print(
        f"Ray overhead per job (1 worker node, series, vs local on 1 thread): "
        f"{(walls['ray-1node'] - walls['local-1thread']) / jobs:.1f}s"
    )
    print(
        f"demo wall: local {walls['local']:.1f}s, ray on two 1-CPU nodes {walls['ray-2nodes']:.1f}s, "
        f"ratio {walls['ray-2nodes'] / walls['local']:.2f} (target <= 1.1)"
    )
    print(f"ray started by the run (ray.address empty): {walls['ray-here']:.1f}s")
    same = hashes["local-1thread"] == hashes["ray-1node"] == hashes["ray-2nodes"] == hashes["ray-here"]
    print(f"ray submissions identical to local on 1 thread: {same}")


if __name__ == "__main__":
    main()
