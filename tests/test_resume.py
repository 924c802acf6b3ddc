"""kill -9 at any stage, then the same command: it resumes and ends with the same submission."""

import fcntl
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import cli_command, cli_env, write_config

FOLD0 = "runs/exp/scratch_cnn/fold0"
HEAD_EPOCHS, ALL_EPOCHS = 2, 3


def _start(workdir: Path, experiment: str, root: Path, cache: Path) -> subprocess.Popen:
    cfg = write_config(
        workdir / f"{experiment}.yaml",
        experiment=experiment,
        data={"root": root, "cache_dir": cache},
        models=[
            {
                "name": "scratch_cnn",
                "pretrained": False,
                "phases": [
                    {"epochs": HEAD_EPOCHS, "train": "head", "lr": 0.003},  # cached frozen trunk
                    {"epochs": ALL_EPOCHS, "train": "all", "lr": 0.003},  # full images, augmented
                ],
            }
        ],
        train={"batch_size": 8, "ema": 0.9, "hflip": 0.5, "shift_scale_rotate": 0.5, "brightness_contrast": 0.3},
    )
    return subprocess.Popen(
        cli_command("run", cfg),
        cwd=workdir,
        env=cli_env(),
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


def _metrics_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)  # written whole by rename: never half a file
    except FileNotFoundError:
        return 0


KILL_POINTS = {
    # while decoding images into the cache (or just after)
    "decoding": lambda w: any(w.glob("runs/cache/.*.tmp*")) or any(w.glob("folds/*.csv")),
    # mid-fold, in the head phase (cached frozen trunk), after an epoch checkpoint
    "head_phase": lambda w: (w / FOLD0 / "last.pt").is_file(),
    # mid-fold, in the uncached, augmented `all` phase: its first epoch is checkpointed
    "all_phase": lambda w: _metrics_rows(w / FOLD0 / "metrics.csv") >= HEAD_EPOCHS + 1,
    # between prediction and the next fold's training
    "between_folds": lambda w: (w / FOLD0 / "predict_done.json").is_file(),
}


def _wait_for(condition, workdir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not condition(workdir):
        assert proc.poll() is None, "the run ended before the point where it should be killed"
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def _epochs_run(out: str, fold: int) -> list[int]:
    return [int(n) for n in re.findall(rf"^scratch_cnn fold {fold} epoch (\d+):", out, re.M)]


@pytest.mark.parametrize("kill_at", list(KILL_POINTS))
def test_kill_and_resume_gives_the_same_submission(demo_root, tmp_path, reference, kill_at):
    cache = tmp_path / "runs" / "cache"
    proc = _start(tmp_path, "exp", demo_root, cache)
    _wait_for(KILL_POINTS[kill_at], tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "submissions").glob("*.csv"))
    out = _finish(_start(tmp_path, "exp", demo_root, cache))
    if kill_at in ("head_phase", "all_phase"):
        # fold 0 continued from its checkpoint: the rerun trains only the epochs after it
        resumed = re.findall(r"^scratch_cnn fold 0: resuming after epoch (\d+)$", out, re.M)
        assert len(resumed) == 1, out
        done = int(resumed[0])
        assert done >= (1 if kill_at == "head_phase" else HEAD_EPOCHS + 1)
        assert done < HEAD_EPOCHS + ALL_EPOCHS, "fold 0 had finished training before the kill"
        assert _epochs_run(out, 0) == list(range(done + 1, HEAD_EPOCHS + ALL_EPOCHS + 1)), out
        assert "already trained" not in out
        if kill_at == "all_phase":  # the head phase is not run again
            assert "fold 0: phase 1/2" not in out and "fold 0: phase 2/2 train=all" in out
        assert _epochs_run(out, 1) == list(range(1, HEAD_EPOCHS + ALL_EPOCHS + 1))  # fold 1 had not started
    if kill_at == "between_folds":
        assert "scratch_cnn fold 0: already trained, skipping" in out and not _epochs_run(out, 0)
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
