"""A Kaggle session end to end, on CPU: the run in a (simulated) Kaggle notebook keeps its caches on scratch;
local.jobs=2 gives the submission of local.jobs=1 at the same threads per job; a budget stops the run cleanly and
resume_from a read-only copy of its output finishes it with the same submission; a killed job is reported and the
other finishes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import cli, cli_command, cli_env, wait_for, write_config

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TWO_JOBS = {"OMP_NUM_THREADS": "2"}  # two cores shared out: one thread a job, as ONE_THREAD's single job has


def _config(folder: Path, root: Path, **extra) -> Path:
    return write_config(
        folder / "c.yaml",
        data={"root": root, **extra.pop("data", {})},
        models=[
            {
                "name": "scratch_cnn",
                "pretrained": False,
                "phases": [{"epochs": 1, "train": "head", "lr": 0.003}, {"epochs": 2, "train": "all", "lr": 0.003}],
            }
        ],
        **extra,
    )


def _submission(folder: Path) -> bytes:
    (path,) = (folder / "submissions").glob("exp-*.csv")
    return path.read_bytes()


def _tree(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def kaggle_run(demo_root, tmp_path_factory):
    """The uninterrupted run, one job at a time on one thread, in a Kaggle notebook whose /kaggle is a temporary
    folder: (its working folder, its output)."""
    root = tmp_path_factory.mktemp("kaggle")
    for d in ("working", "temp"):
        (root / d).mkdir()
    work = root / "working"
    env = {**ONE_THREAD, "AGEGENDER_KAGGLE_ROOT": str(root), "KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    r = cli("run", _config(work, demo_root), cwd=work, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return work, r.stdout


def test_in_a_kaggle_notebook_caches_go_to_scratch(kaggle_run):
    work, out = kaggle_run
    assert "budget: 11h30m from the run's start (a Kaggle session lasts 12h" in out
    assert f"kaggle: outputs under {work} about 0.0 GB" in out
    assert "weights: scratch_cnn: no pretrained weights" in out
    assert not (work / "runs" / "cache").exists()
    assert list((work.parent / "temp" / "agegender-cache").glob("*-train-32px-*.npy"))
    assert list((work.parent / "temp" / "agegender-cache").glob("trunk-*.npy"))
    assert not list(work.rglob("last.pt"))  # kept only while its fold trains
    report = (work / "runs/exp/report.html").read_text()
    assert "<h2>Starting weights</h2>" in report and "scratch_cnn: no pretrained weights" in report


def test_two_jobs_at_once_give_the_same_submission(kaggle_run, demo_root, tmp_path):
    r = cli("run", _config(tmp_path, demo_root), "local.jobs=2", cwd=tmp_path, env=TWO_JOBS)
    assert r.returncode == 0, r.stdout + r.stderr
    started = re.findall(r"^scratch_cnn fold (\d): started in process (\d+) on 1 CPU thread", r.stdout, re.M)
    assert sorted(k for k, _ in started) == ["0", "1"] and started[0][1] != started[1][1]
    assert _submission(tmp_path) == _submission(kaggle_run[0])


def test_a_budget_stops_cleanly_and_resume_from_a_read_only_copy_finishes(kaggle_run, demo_root, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    r = cli("run", _config(first, demo_root), "budget=0.01s", cwd=first, env=ONE_THREAD)
    # the budget is gone before training starts, but fold 0's first epoch runs (no epoch time is known before it);
    # at its end the next one does not fit
    assert r.returncode == 75, r.stdout + r.stderr
    *progress, line = [x for x in r.stderr.splitlines() if x.strip()]  # the image cache's bars, then one line
    assert all(p.startswith("cache ") for p in progress), r.stderr
    assert line.startswith("stopped: the budget of 0s is used up")
    assert "done: none; stopped: scratch_cnn fold 0 after epoch 1 of 3; not started: scratch_cnn fold 1" in line
    assert "resume_from=" in line
    assert (first / "runs/exp/scratch_cnn/fold0/last.pt").is_file() and not (first / "submissions").exists()

    earlier = tmp_path / "input" / "first-session"  # what a new Kaggle session sees of the last one's output
    shutil.copytree(first, earlier, ignore=shutil.ignore_patterns("cache"))
    for p in earlier.rglob("*"):
        p.chmod(p.stat().st_mode & 0o555)
    before = _tree(earlier)
    second = tmp_path / "second"
    second.mkdir()
    r = cli("run", _config(second, demo_root), f"resume_from={earlier}", cwd=second, env=ONE_THREAD)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "took over 0 trained fold(s) and 1 unfinished one(s)" in r.stdout
    assert "scratch_cnn fold 0: resuming after epoch 1" in r.stdout
    assert _submission(second) == _submission(kaggle_run[0])
    assert _tree(earlier) == before  # nothing under it written


def test_another_config_is_refused_by_resume_from(kaggle_run, demo_root, tmp_path):
    r = cli(
        "run",
        _config(tmp_path, demo_root, train={"batch_size": 4}),
        f"resume_from={kaggle_run[0]}",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "was run with another config (changed: train.batch_size)" in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "folds").exists()  # refused before any writing


def test_a_killed_job_is_reported_and_the_other_finishes(demo_root, tmp_path):
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cli_command("run", _config(tmp_path, demo_root), "local.jobs=2"),
            cwd=tmp_path,
            env=cli_env({**TWO_JOBS, "PYTHONUNBUFFERED": "1"}),  # each line as it is printed
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        pid = wait_for(lambda: re.search(r"scratch_cnn fold 1: started in process (\d+)", log.read_text()))
        fold1 = tmp_path / "runs/exp/scratch_cnn/fold1"
        wait_for(lambda: (fold1 / "last.pt").is_file(), every=0.005)
        os.kill(int(pid.group(1)), signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, log.read_text() + err
    assert "error: scratch_cnn fold 1: its process was killed by SIGKILL" in err
    assert err.strip().splitlines()[-1] == (
        "error: 1 job(s) failed (scratch_cnn-fold1); finished folds are kept and a rerun skips them"
    )
    assert "Traceback" not in err
    fold0 = tmp_path / "runs/exp/scratch_cnn/fold0"
    assert (fold0 / "predict_done.json").is_file() and not (fold1 / "train_done.json").is_file()
    r = cli("run", _config(tmp_path, demo_root), "local.jobs=2", cwd=tmp_path, env=TWO_JOBS)
    assert r.returncode == 0 and "scratch_cnn fold 1: resuming after epoch" in r.stdout, r.stdout + r.stderr


def test_too_many_jobs_are_refused_before_anything_is_written(demo_root, tmp_path):
    r = cli("run", _config(tmp_path, demo_root), "local.jobs=3", cwd=tmp_path, env=TWO_JOBS)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: local.jobs=3: this machine has 2 usable CPU core(s) and each job needs one; use local.jobs=2 or fewer"
    )
    assert not any(tmp_path.glob("runs")) and not any(tmp_path.glob("folds"))


def _running(pid: str) -> bool:
    """Whether the process runs (an exited child nobody has reaped yet is a zombie, state Z)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_jobs_stop_when_their_run_is_killed(demo_root, tmp_path):
    """kill -9 of the run (a restarted notebook kernel): its jobs' processes stop too, releasing their folds' locks
    and GPUs, and the same command resumes."""
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cli_command("run", _config(tmp_path, demo_root), "local.jobs=2"),
            cwd=tmp_path,
            env=cli_env({**TWO_JOBS, "PYTHONUNBUFFERED": "1"}),
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
        pids = wait_for(
            lambda: (
                re.findall(r"started in process (\d+)", log.read_text())
                if log.read_text().count("started in process") == 2
                else None
            )
        )
        proc.kill()
        proc.wait()
    wait_for(lambda: not any(_running(pid) for pid in pids), timeout=120)
    r = cli("run", _config(tmp_path, demo_root), "local.jobs=2", cwd=tmp_path, env=TWO_JOBS)
    assert r.returncode == 0, r.stdout + r.stderr
