"""A Kaggle session, simulated on this machine (by hand; docs/RESULTS.md "A Kaggle session used to the full").

A temporary /kaggle (AGEGENDER_KAGGLE_ROOT, KAGGLE_KERNEL_RUN_TYPE) holds working/ and temp/; the config runs in
working/ through the CLI, as a notebook runs it, four times:
  A  local.jobs=1 with every core (1 job x N threads): wall time; bytes under working/ (outputs) and temp/ (caches)
  B  local.jobs=N (N jobs x 1 thread each): wall time, against A's
  C  as A with budget = --budget-share x A's training time: where it stopped, against the budget
  D  resume_from a read-only copy of C's output, in a fresh working folder: the submission, against A's

    .venv/bin/python benchmarks/kaggle_session.py [CONFIG] [key=value ...] [--budget-share 0.5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.core.cores import usable_cores  # noqa: E402


def size(folder: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not any(s in p.parts for s in skip))


def session(root: Path, name: str) -> tuple[Path, dict]:
    """A fresh /kaggle with working/ and temp/, and the environment of a notebook in it."""
    kaggle = root / name
    for d in ("working", "temp", "input"):
        (kaggle / d).mkdir(parents=True)
    env = {**os.environ, "AGEGENDER_KAGGLE_ROOT": str(kaggle), "KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    env.update({"WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)})
    return kaggle, env


def run(kaggle: Path, env: dict, args: list[str], threads: int) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", *args],
        cwd=kaggle / "working",
        env={**env, "OMP_NUM_THREADS": str(threads)},
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - t0, r


def submission(kaggle: Path) -> bytes:
    (path,) = (kaggle / "working" / "submissions").glob("*.csv")
    return path.read_bytes()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--budget-share", type=float, default=0.5)
    a = p.parse_args()
    cores = usable_cores()
    args = [str(Path(a.config).resolve()), *a.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ka, env = session(root, "a")
        ta, ra = run(ka, env, [*args, "local.jobs=1"], cores)
        assert ra.returncode == 0, ra.stdout + ra.stderr
        trained = float(re.search(r"run finished in (\d+)s", ra.stdout).group(1))
        line = next(x for x in ra.stdout.splitlines() if x.startswith("kaggle: "))
        outputs, data = size(ka / "working", skip=("demo-data",)), size(ka / "working" / "runs" / "demo-data")
        caches = size(ka / "temp")
        print(
            f"A local.jobs=1 x {cores} threads: {ta:.0f}s; under working/ {outputs / 1e6:.1f} MB (+ the demo's "
            f"generated data {data / 1e6:.1f} MB), under temp/ (caches) {caches / 1e6:.1f} MB"
        )
        print(f"  the run's own estimate: {line}")

        kb, env_b = session(root, "b")
        tb, rb = run(kb, env_b, [*args, f"local.jobs={cores}"], cores)
        assert rb.returncode == 0, rb.stdout + rb.stderr
        print(f"B local.jobs={cores} x 1 thread: {tb:.0f}s, {ta / tb:.2f}x A's speed")

        budget = max(1, round(trained * a.budget_share))
        kc, env_c = session(root, "c")
        tc, rc = run(kc, env_c, [*args, "local.jobs=1", f"budget={budget}s"], cores)
        stop = rc.stderr.strip().splitlines()[-1] if rc.stderr.strip() else ""
        print(f"C budget={budget}s ({a.budget_share:.0%} of A's {trained:.0f}s): exit {rc.returncode} after {tc:.0f}s")
        print(f"  {stop[:400]}")
        used = re.search(r"\(([\dhms]+) since the start\)", stop)
        epochs = re.findall(r"^(\S+ fold \d+) epoch (\d+):", rc.stdout, re.M)
        print(f"  stopped at {used.group(1) if used else '?'} of the budget's {budget}s; {len(epochs)} epochs trained")

        earlier = root / "input-c"
        shutil.copytree(kc / "working", earlier)
        for f in earlier.rglob("*"):
            f.chmod(f.stat().st_mode & 0o555)
        kd, env_d = session(root, "d")
        td, rd = run(kd, env_d, [*args, "local.jobs=1", f"resume_from={earlier}", "budget=none"], cores)
        assert rd.returncode == 0, rd.stdout + rd.stderr
        same = submission(kd) == submission(ka)
        print(
            f"D resume_from C's read-only output: {td:.0f}s (C + D = {tc + td:.0f}s against A's {ta:.0f}s); "
            f"submission {'byte-identical to' if same else 'DIFFERENT from'} A's"
        )
        for f in earlier.rglob("*"):
            f.chmod(f.stat().st_mode | 0o200)


if __name__ == "__main__":
    main()
