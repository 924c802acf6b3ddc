"""export --format kaggle: the folder is a Kaggle dataset (metadata, notebook, no torch, no pickle, YuNet's model), and
in a fresh virtual environment with nothing installed but its own wheels (pip --no-index), predict_submission.py
writes the pipeline's own submission (ages within 0.01 years, every gender the same) in the competition's order and
columns; on a Python other than its wheels' it stops with one line instead of installing them."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import venv

import cv2
import pandas as pd
import pytest
from conftest import REPO, cli, write_config

from pipeline.data.faces import YUNET_MODEL
from pipeline.exporting.kaggle_export import DATA_FILES, PACKAGE, SOURCES
from pipeline.serving.bundle import load_bundle
from pipeline.serving.kaggle_entry import NEEDED
from pipeline.serving.kaggle_predict import COMPETITION_FILE, _names, submission

WHEELHOUSE = REPO / ".venv" / "kaggle-wheels"  # fetched once by run.sh (python -m pipeline.exporting.kaggle_export)
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
OTHER_PYTHON = "3.12" if PYTHON != "3.12" else "3.11"


@pytest.fixture(scope="module")
def exported(demo_root, tmp_path_factory):
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.fail(f"no wheels in {WHEELHOUSE}: ./run.sh test fetches them (pipeline.exporting.kaggle_export)")
    root = tmp_path_factory.mktemp("kaggle-export")
    data = {"root": str(demo_root), "competition": "age-gender-demo", "gender_labels": ["female", "male"]}
    cfg = write_config(root / "cfg.yaml", data={**data, "face_crop": "detect"})
    r = cli("run", cfg, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("export", cfg, "--format", "kaggle", "--python", PYTHON, "--wheels", WHEELHOUSE, cwd=root,
            env={"KAGGLE_USERNAME": "tester"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exported the Kaggle dataset" in r.stdout and "note:" not in r.stdout
    assert f"wheels for CPython {PYTHON}, Linux x86-64 (--python {PYTHON}; " in r.stdout
    blend = json.loads((root / "runs" / "exp" / "blend.json").read_text())
    return root, root / "runs" / "exp" / "kaggle", root / blend["submission"]


@pytest.fixture(scope="module")
def other_python_copy(exported, tmp_path_factory):
    """A copy of the exported dataset that says its wheels are for another Python."""
    copy = tmp_path_factory.mktemp("other-python") / "kaggle"
    shutil.copytree(exported[1], copy)
    competition = json.loads((copy / "competition.json").read_text())
    (copy / "competition.json").write_text(json.dumps({**competition, "wheels_python": OTHER_PYTHON}))
    return copy


def fresh_venv(where, with_pip: bool = True) -> tuple:
    """A virtual environment holding nothing, and the environment variables of a notebook without pip config."""
    venv.EnvBuilder(with_pip=with_pip, clear=True).create(where / "venv")
    env = {"PATH": f"{where / 'venv' / 'bin'}:/usr/bin:/bin", "HOME": str(where), "PIP_CONFIG_FILE": "/dev/null"}
    return where / "venv" / "bin" / "python", env


def imported_files(source: str) -> set[str]:
    """The package files (relative to pipeline/) and the top-level outside modules a SOURCES file imports."""
    tree = ast.parse((PACKAGE / source).read_text())
    package = source.split("/")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            parts = package[: len(package) - node.level + 1] + (node.module or "").split(".")
            found.add("/".join(parts) + ".py")
    return found


def test_the_sources_import_only_each_other_the_standard_library_and_the_wheels():
    allowed = set(SOURCES) | set(sys.stdlib_module_names) | set(NEEDED)
    for source in SOURCES:
        assert imported_files(source) <= allowed, source
    assert "yuface" not in {name for source in SOURCES for name in imported_files(source)}


def test_the_folder_is_a_kaggle_dataset_without_torch_or_pickle(exported):
    root, out, _ = exported
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"] == "tester/exp-age-gender" and 6 <= len(meta["title"]) <= 50
    nb = json.loads((out / "predict_submission.ipynb").read_text())
    assert nb["nbformat"] == 4 and "predict_submission.py" in nb["cells"][1]["source"]
    wheels = sorted(p.name for p in (out / "wheels").glob("*.whl"))
    assert any(w.startswith("onnxruntime-") for w in wheels) and not any(w.startswith("yuface") for w in wheels)
    assert not any(w.startswith(("torch", "timm", "scikit", "scipy")) for w in wheels)
    assert sorted(p.relative_to(out / "pipeline").as_posix() for p in (out / "pipeline").rglob("*.py")) == sorted(
        SOURCES
    )
    assert YUNET_MODEL.relative_to(PACKAGE).as_posix() in DATA_FILES
    for name in DATA_FILES:  # YuNet's model and its licence
        assert (out / "pipeline" / name).read_bytes() == (PACKAGE / name).read_bytes()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".safetensors")]
    info = json.loads((out / "bundle" / "bundle.json").read_text())
    assert info["runtime"] == "onnx" and info["gender"]["labels"] == {"0": "female", "1": "male"}
    assert info["gender"]["labels_from"] == "the config's data.gender_labels" and info["face_crop"] == "detect"
    assert "0 = female, 1 = male" in (out / "bundle" / "README.md").read_text()
    competition = json.loads((out / "competition.json").read_text())
    assert competition["competition"] == "age-gender-demo" and competition["age_col"] == "age"
    assert competition["wheels_python"] == PYTHON


def test_predict_submission_in_a_fresh_venv_from_the_wheels_writes_the_pipelines_submission(
    exported, other_python_copy, demo_root, astronaut, tmp_path
):
    root, out, pipeline_sub = exported
    python, env = fresh_venv(tmp_path)
    written = tmp_path / "submission.csv"
    args = [str(python), str(out / "predict_submission.py"), str(demo_root), "--out", str(written)]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installing numpy, pandas, opencv-python-headless, onnxruntime, tqdm from" in r.stdout
    assert "images/s" in r.stdout
    check = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0  # nothing brought torch in
    ours = pd.read_csv(pipeline_sub, dtype={"id": str})
    theirs = pd.read_csv(written, dtype={"id": str})
    assert list(theirs.columns) == list(ours.columns) and theirs.id.tolist() == ours.id.tolist()
    assert (theirs.age - ours.age).abs().max() <= 0.01
    assert (theirs.gender == ours.gender).all()

    # the copied sources detect with the copied YuNet model
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pipeline.data import faces\n"
        "print(faces.YUNET_MODEL.resolve())\n"
        "print(len(faces.detect_faces(faces.decode_rgb(faces.read_bytes(sys.argv[2])))))"
    )
    detect = subprocess.run([str(python), "-c", code, str(out), str(photo)], env=env, capture_output=True, text=True)
    assert detect.returncode == 0, detect.stderr
    assert detect.stdout.split() == [str((out / "pipeline" / DATA_FILES[0]).resolve()), "1"]

    details = tmp_path / "details.csv"
    again = subprocess.run([*args, "--details", str(details)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "installing" not in again.stdout  # the wheels are installed once
    # the offline predictor's intervals and calibrated probabilities are the bundle's, here in the pipeline
    _, pred = submission(load_bundle(out / "bundle"), demo_root, _names(out / COMPETITION_FILE))
    got = pd.read_csv(details, dtype={"id": str}).set_index("id")
    assert list(got.columns) == ["age", "age_low", "age_high", "gender_prob", "gender"] and len(got) == len(pred)
    assert (got - pred.loc[got.index, got.columns]).abs().to_numpy().max() <= 1e-3
    elsewhere = [str(python), str(other_python_copy / "predict_submission.py"), *args[2:]]
    other = subprocess.run(elsewhere, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert other.returncode == 0, other.stderr  # nothing to install: the wheels' Python does not matter
    empty = tmp_path / "no-test-set"
    empty.mkdir()
    bad = subprocess.run([*args[:2], str(empty)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "no test set" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_predict_submission_refuses_to_install_wheels_of_another_python(other_python_copy, demo_root, tmp_path):
    python, env = fresh_venv(tmp_path, with_pip=False)  # the check comes before pip
    written = tmp_path / "submission.csv"
    args = [str(python), str(other_python_copy / "predict_submission.py"), str(demo_root), "--out", str(written)]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (
        f"error: this dataset's wheels are for CPython {OTHER_PYTHON}, but this notebook runs Python {PYTHON}: "
        f"export again with --python {PYTHON} (agegender export CONFIG --format kaggle --python {PYTHON})\n"
    )
    assert not written.exists()
