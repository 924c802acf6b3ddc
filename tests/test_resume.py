"""kill -9 at any stage, then the same command: it resumes and ends with the same submission."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
experiment: {experiment}
data: {{root: {root}, img_size: 32, cache_dir: {cache}}}
folds: {{n_splits: 2, seed: 3}}
models:
  - name: scratch_cnn
    pretrained: false
    phases: [{{epochs: 2, train: head, lr: 0.003}}, {{epochs: 3, train: all, lr: 0.003}}]
train: {{batch_size: 8, ema: 0.9}}
"""
ENV = {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}


def _start(workdir: Path, experiment: str, root: Path, cache: Path) -> subprocess.Popen:
    cfg = workdir / f"{experiment}.yaml"
    cfg.write_text(CONFIG.format(experiment=experiment, root=root, cache=cache))
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(cfg)],
        cwd=workdir,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, out + err
    return out


def _submission(workdir: Path, experiment: str) -> bytes:
    (path,) = (workdir / "submissions").glob(f"{experiment}-*.csv")
    return path.read_bytes()


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _finish(_start(workdir, "ref", demo_root, workdir / "cache"))
    return _submission(workdir, "ref")


def _wait_for(path_globs: str, workdir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until any of the `|`-separated globs matches."""
    t0 = time.time()
    while not any(list(workdir.glob(g)) for g in path_globs.split("|")):
        assert proc.poll() is None, "the run ended before the point where it should be killed"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.parametrize(
    "kill_at",
    [
        "runs/cache/.*.tmp*|folds/*.csv",  # while decoding images into the cache (or just after)
        "runs/exp/scratch_cnn/fold0/last.pt",  # mid-fold, after an epoch checkpoint
        "runs/exp/scratch_cnn/fold0/predict_done.json",  # between prediction and the next fold's training
    ],
)
def test_kill_and_resume_gives_the_same_submission(demo_root, tmp_path, reference, kill_at):
    cache = tmp_path / "runs" / "cache"
    proc = _start(tmp_path, "exp", demo_root, cache)
    _wait_for(kill_at, tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "submissions").glob("*.csv"))
    out = _finish(_start(tmp_path, "exp", demo_root, cache))
    if kill_at.endswith("last.pt"):
        assert "resuming after epoch" in out or "already trained" in out
    assert _submission(tmp_path, "exp") == reference
    assert not list(tmp_path.rglob("*.tmp*"))


def test_a_second_run_of_the_same_experiment_is_refused(demo_root, tmp_path):
    lock = tmp_path / "runs" / "exp" / ".lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as f:  # another live process holds the experiment
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"pid {os.getpid()}")
        f.flush()
        proc = _start(tmp_path, "exp", demo_root, tmp_path / "cache")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"experiment 'exp' is already running (pid {os.getpid()})" in err
