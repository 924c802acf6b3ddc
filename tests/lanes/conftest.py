"""The notebook lanes of .ci/run (tests/lanes/run.sh): these tests run in a venv of Kaggle's Python and stack into
which the agegender wheel was pip-installed, against the installed package and its `agegender` command, never this
checkout. tests/conftest.py leaves this folder out unless AGEGENDER_LANE is set."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline.data.demo import make_demo

BIN = Path(sys.executable).parent
WHEEL = Path(os.environ.get("AGEGENDER_WHEEL", ""))  # the wheel the lane built and installed
KAGGLE_WHEELS = Path(os.environ.get("AGEGENDER_KAGGLE_WHEELS", ""))  # export --format kaggle's wheels, fetched once
SLUG = "age-gender-demo"


def pytest_sessionstart(session):
    here = Path(pipeline.__file__).resolve()
    if "site-packages" not in here.parts and os.environ.get("AGEGENDER_LANE_EDITABLE") != "1":
        pytest.exit(f"the lane must test the installed package, not {here}", returncode=2)


def agegender(*args, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The installed `agegender` command in `cwd`, with nothing of the caller's environment but PATH's venv."""
    base = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd), "WANDB_MODE": "disabled"}
    cmd = [str(BIN / "agegender"), *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stdout + r.stderr
    return r


def read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="session")
def kaggle_root(tmp_path_factory) -> Path:
    """A Kaggle notebook's folders: input/<slug>/ (the demo competition, read-only) and an empty working/."""
    root = tmp_path_factory.mktemp("kaggle")
    make_demo(root / "input" / SLUG, n_train=90, n_test=24, size=48, seed=1)
    read_only(root / "input")
    (root / "working").mkdir()
    yield root
    for p in [root / "input", *(root / "input").rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)  # so that pytest can clean up
    shutil.rmtree(root / "input", ignore_errors=True)


@pytest.fixture(scope="session")
def demo_run(kaggle_root, tmp_path_factory) -> Path:
    """The packaged demo recipe, faces detected, run by the installed command on the read-only competition."""
    work = tmp_path_factory.mktemp("work")
    (work / "pipeline.py").write_text("raise SystemExit('a stray pipeline.py in the working folder was imported')\n")
    comp = kaggle_root / "input" / SLUG
    overrides = [f"data.root={comp}", "data.face_crop=detect", f"data.competition={SLUG}"]
    overrides += ["data.gender_labels=[female,male]", "models.1.phases.2.epochs=1"]
    r = agegender("run", "demo", *overrides, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "face_crop=detect" in r.stdout and "submission: submissions/demo-" in r.stdout
    return work
