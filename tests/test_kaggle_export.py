"""export format=kaggle: the folder is a Kaggle dataset (metadata, notebook, no torch, no pickle), and in a fresh
virtual environment with nothing installed but its own wheels (pip --no-index), predict_submission.py writes the
pipeline's own submission (ages within 0.01 years, every gender the same) in the competition's order and columns."""

from __future__ import annotations

import json
import subprocess
import sys
import venv

import pandas as pd
import pytest
from conftest import REPO, cli, write_config

from pipeline.serving.kaggle_export import SOURCES

WHEELHOUSE = REPO / ".venv" / "kaggle-wheels"  # fetched once by run.sh (python -m pipeline.serving.kaggle_export)
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture(scope="module")
def exported(demo_root, tmp_path_factory):
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.fail(f"no wheels in {WHEELHOUSE}: ./run.sh test fetches them (python -m pipeline.serving.kaggle_export)")
    root = tmp_path_factory.mktemp("kaggle-export")
    data = {"root": str(demo_root), "competition": "age-gender-demo", "gender_labels": ["female", "male"]}
    cfg = write_config(root / "cfg.yaml", data=data)
    r = cli("run", cfg, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("export", cfg, "format=kaggle", f"python={PYTHON}", f"wheels={WHEELHOUSE}", cwd=root,
            env={"KAGGLE_USERNAME": "tester"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exported the Kaggle dataset" in r.stdout and "note:" not in r.stdout
    blend = json.loads((root / "runs" / "exp" / "blend.json").read_text())
    return root, root / "runs" / "exp" / "kaggle", root / blend["submission"]


def test_the_folder_is_a_kaggle_dataset_without_torch_or_pickle(exported):
    root, out, _ = exported
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"] == "tester/exp-age-gender" and 6 <= len(meta["title"]) <= 50
    nb = json.loads((out / "predict_submission.ipynb").read_text())
    assert nb["nbformat"] == 4 and "predict_submission.py" in nb["cells"][1]["source"]
    wheels = sorted(p.name for p in (out / "wheels").glob("*.whl"))
    assert any(w.startswith("onnxruntime-") for w in wheels) and any(w.startswith("yuface-") for w in wheels)
    assert not any(w.startswith(("torch", "timm", "scikit", "scipy")) for w in wheels)
    assert sorted(p.relative_to(out / "pipeline").as_posix() for p in (out / "pipeline").rglob("*.py")) == sorted(
        SOURCES
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".safetensors")]
    info = json.loads((out / "bundle" / "bundle.json").read_text())
    assert info["runtime"] == "onnx" and info["gender"]["labels"] == {"0": "female", "1": "male"}
    assert info["gender"]["labels_from"] == "the config's data.gender_labels"
    assert "0 = female, 1 = male" in (out / "bundle" / "README.md").read_text()
    competition = json.loads((out / "competition.json").read_text())
    assert competition["competition"] == "age-gender-demo" and competition["age_col"] == "age"


def test_predict_submission_in_a_fresh_venv_from_the_wheels_writes_the_pipelines_submission(
    exported, demo_root, tmp_path
):
    root, out, pipeline_sub = exported
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": "/dev/null"}
    written = tmp_path / "submission.csv"
    args = [str(python), str(out / "predict_submission.py"), str(demo_root), "--out", str(written)]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installing numpy, pandas, opencv-python-headless, onnxruntime, yuface, tqdm" in r.stdout
    assert "images/s" in r.stdout
    check = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0  # nothing brought torch in
    ours = pd.read_csv(pipeline_sub, dtype={"id": str})
    theirs = pd.read_csv(written, dtype={"id": str})
    assert list(theirs.columns) == list(ours.columns) and theirs.id.tolist() == ours.id.tolist()
    assert (theirs.age - ours.age).abs().max() <= 0.01
    assert (theirs.gender == ours.gender).all()

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "installing" not in again.stdout  # the wheels are installed once
    empty = tmp_path / "no-test-set"
    empty.mkdir()
    bad = subprocess.run([*args[:2], str(empty)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "no test set" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
