"""Shared fixtures and helpers: the synthetic competition, the CLI in a clean subprocess, small YAML configs."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from skimage import data as skimage_data

from pipeline.data.demo import make_demo

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parents[1]
collect_ignore = [] if os.environ.get("AGEGENDER_LANE") else ["lanes"]  # tests/lanes run in .ci's notebook lanes

# A small, fast experiment: scratch_cnn at 32 px, 2 folds. write_config() merges overrides into it.
BASE_CONFIG = {
    "experiment": "exp",
    "data": {"img_size": 32},
    "folds": {"n_splits": 2, "seed": 3},
    "models": [{"name": "scratch_cnn", "pretrained": False, "phases": [{"epochs": 2, "train": "all", "lr": 0.003}]}],
    "train": {"batch_size": 8},
}


def _merge(base: dict, overrides: dict) -> dict:
    """Dicts merge key by key (recursively); any other value, lists included, replaces the base's."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(value):
    """Paths become text so that yaml.safe_dump can write them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def config_dict(**overrides) -> dict:
    """BASE_CONFIG with `overrides` merged in, e.g. config_dict(experiment="x", data={"root": root})."""
    return _plain(_merge(BASE_CONFIG, overrides))


def write_config(path: Path, **overrides) -> Path:
    """Write config_dict(**overrides) as YAML to `path` and return the path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config_dict(**overrides), sort_keys=False))
    return path


def cli_env(env: dict | None = None) -> dict:
    """A clean environment for `python -m pipeline`: this repo on PYTHONPATH, W&B off unless `env` says
    otherwise (e.g. {"WANDB_MODE": "offline", "HOME": str(tmp)}), nothing else from the caller."""
    return {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", **(env or {})}


def wait_for(predicate, timeout: float = 120, every: float = 0.02):
    """predicate()'s first truthy value, polled every `every` seconds; fails the test after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def free_port() -> int:
    """A TCP port nobody listens on, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(proc: subprocess.Popen, url: str, log: Path) -> bool:
    """Whether the web page at `url` (loopback, never through a proxy) answers 200; fails the test with the server's
    log when its process has died."""
    assert proc.poll() is None, log.read_text()
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def cli(*args, cwd, env: dict | None = None, check_traceback: bool = True, timeout: float = 600):
    """Run `python -m pipeline ARGS` in `cwd`; returns the CompletedProcess (text stdout / stderr).
    Fails the test on a traceback in stderr unless check_traceback=False."""
    r = subprocess.run(cli_command(*args), cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout)
    if check_traceback:
        assert "Traceback" not in r.stderr, r.stdout + r.stderr
    return r


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small synthetic competition in the Kaggle layout, shared by the tests (read-only)."""
    return make_demo(tmp_path_factory.mktemp("demo") / "comp", n_train=90, n_test=24, size=48, seed=1)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder so that runs/, folds/ and submissions/ are the test's own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """A real face for YuNet: scikit-image's astronaut photograph (512 x 512 RGB, one face)."""
    return skimage_data.astronaut()


def paste(scene: np.ndarray, img: np.ndarray, x: int, y: int, width: int) -> np.ndarray:
    """`img` scaled to `width` pixels wide, pasted into a copy of `scene` with its top left at (x, y)."""
    h = round(img.shape[0] * width / img.shape[1])
    out = scene.copy()
    out[y : y + h, x : x + width] = cv2.resize(img, (width, h), interpolation=cv2.INTER_AREA)
    return out


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group `pgid` is still running."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def ctrl_c(args: list, started, settle: float = 0.0, **popen) -> str:
    """Run `args` in its own process group, wait until started(stderr so far) is true (and `settle` seconds
    more), then send SIGINT to the whole group as a terminal's Ctrl-C does. Asserts exit 130 and that no process
    of the group is left; returns stderr. SIGINT starts at its default even when this test run was started in
    the background (`cmd &` in a script starts with SIGINT ignored, and Python then installs no handler)."""
    proc = subprocess.Popen(
        args,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **popen,
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    wait_for(lambda: started("".join(err)), timeout=120, every=0.1)
    time.sleep(settle)
    assert proc.poll() is None, "finished before Ctrl-C: give it more work"
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=10)
    wait_for(lambda: not group_alive(proc.pid), timeout=30, every=0.2)
    return "".join(err)
