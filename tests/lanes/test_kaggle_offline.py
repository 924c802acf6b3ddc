"""The offline Kaggle predictor on Kaggle's Python and stack: `export --format kaggle` from the installed package
(wheels for Kaggle's Python by default), then, in a fresh venv holding only the image's numpy, pandas and OpenCV,
predict_submission.py installs from the dataset's wheels only what is missing, changes none of those, brings no torch,
and writes the pipeline's own submission from the read-only competition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pandas as pd
import pytest
from conftest import KAGGLE_WHEELS, SLUG, agegender

import pipeline

PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
IMAGE = Path(__file__).with_name("kaggle-image.txt")
PRESENT = ("numpy", "pandas", "opencv-python-headless")  # what the fresh venv holds, at the image's versions


def image_pins(names: tuple[str, ...]) -> list[str]:
    pins = [line.strip() for line in IMAGE.read_text().splitlines() if line.split("==")[0].strip() in names]
    assert len(pins) == len(names), pins
    return pins


def freeze(python: Path) -> set[str]:
    r = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return set(r.stdout.splitlines())


@pytest.fixture(scope="module")
def dataset(demo_run) -> Path:
    if not any(KAGGLE_WHEELS.glob("*.whl")):
        pytest.fail(f"no wheels in {KAGGLE_WHEELS} (AGEGENDER_KAGGLE_WHEELS): tests/lanes/run.sh fetches them")
    r = agegender("export", "demo", "--format", "kaggle", "--wheels", KAGGLE_WHEELS, cwd=demo_run)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wheels for CPython 3.12, Linux x86-64 (Kaggle's notebook image; --python 3.X for another)" in r.stdout
    return demo_run / "runs" / "demo" / "kaggle"


@pytest.fixture(scope="module")
def notebook_python(tmp_path_factory) -> Path:
    """A fresh venv of this Python holding Kaggle's numpy, pandas and OpenCV (installed from the registry)."""
    where = tmp_path_factory.mktemp("notebook") / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    python = where / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", *image_pins(PRESENT)]
    r = subprocess.run(install, env=os.environ, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    return python


def test_the_dataset_is_for_kaggles_python_from_the_installed_package(dataset):
    assert json.loads((dataset / "competition.json").read_text())["wheels_python"] == PYTHON == "3.12"
    wheels = [p.name for p in (dataset / "wheels").glob("*.whl")]
    assert any(w.startswith("numpy-") and "-cp312-" in w for w in wheels)
    assert not any(w.startswith(("torch", "yuface")) for w in wheels)
    package = Path(pipeline.__file__).parent
    for name in ("serving/kaggle_predict.py", "data/faces.py", "data/yunet/face_detection_yunet_2023mar.onnx"):
        assert (dataset / "pipeline" / name).read_bytes() == (package / name).read_bytes(), name


def test_predict_submission_on_kaggles_stack_installs_only_what_is_missing(
    dataset, notebook_python, demo_run, kaggle_root, tmp_path
):
    before = freeze(notebook_python)
    env = {"PATH": f"{notebook_python.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": "/dev/null"}
    written = tmp_path / "submission.csv"
    args = [str(notebook_python), str(dataset / "predict_submission.py"), str(kaggle_root / "input" / SLUG)]
    r = subprocess.run([*args, "--out", str(written)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"installing onnxruntime, tqdm from {dataset / 'wheels'} (offline)" in r.stdout
    after = freeze(notebook_python)
    assert before <= after, before - after  # numpy, pandas and OpenCV as the image had them
    assert {line for line in before if line.startswith(("numpy==", "pandas==", "opencv"))} == set(image_pins(PRESENT))
    check = subprocess.run([str(notebook_python), "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0  # nothing brought torch in

    blend = json.loads((demo_run / "runs" / "demo" / "blend.json").read_text())
    ours = pd.read_csv(demo_run / blend["submission"], dtype={"id": str})
    theirs = pd.read_csv(written, dtype={"id": str})
    assert list(theirs.columns) == list(ours.columns) and theirs.id.tolist() == ours.id.tolist()
    assert (theirs.age - ours.age).abs().max() <= 0.01
    assert (theirs.gender == ours.gender).all()
