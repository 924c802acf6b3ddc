"""export --format kaggle: runs/<experiment>/kaggle/, a folder to upload as a Kaggle dataset that writes the
competition's submission in a notebook with the internet off. It holds the ONNX bundle, the torch-free part of
this package that runs it (SOURCES, and DATA_FILES: the face detector), the wheels of what that needs for Linux x86-64
and the Python named (fetched by pip at export time), predict_submission.py (and a notebook that runs it),
competition.json and dataset-metadata.json."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..core.config import Config
from ..core.errors import PipelineError
from ..core.files import atomic_folder
from ..core.layout import KAGGLE_DIR
from ..data.competition import load_competition
from ..serving.kaggle_predict import COMPETITION_FILE

KAGGLE_PYTHON = "3.12"  # the Python of Kaggle's current notebook image
PACKAGE = Path(__file__).resolve().parents[1]  # the `pipeline` package as installed (site-packages or a checkout)
REQUIREMENTS = Path(__file__).with_name("kaggle-requirements.txt")  # package data
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
SOURCES = (  # what pipeline.serving.kaggle_predict imports, and nothing that needs torch (tests/test_kaggle_export)
    "__init__.py",
    "core/__init__.py",
    "core/calibration.py",
    "core/choices.py",
    "core/cores.py",
    "core/errors.py",
    "core/files.py",
    "core/layout.py",
    "data/__init__.py",
    "data/faces.py",
    "data/imaging.py",
    "data/test_set.py",
    "serving/__init__.py",
    "serving/bundle.py",
    "serving/kaggle_predict.py",
)
DATA_FILES = ("data/yunet/face_detection_yunet_2023mar.onnx", "data/yunet/LICENSE")  # data/faces.py's YUNET_MODEL
SCRIPT = "predict_submission.py"
META = "dataset-metadata.json"


def fetch_wheels(dest: Path, python: str, find_links: str = "") -> list[str]:
    """pip download of kaggle-requirements.txt for Linux x86-64 and `python` into `dest`: from the package index,
    or only from the folder `find_links` (a wheelhouse fetched earlier; no network)."""
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise PipelineError(f"--python {python!r}: give the Python version of the notebook image, e.g. {KAGGLE_PYTHON}")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", python]
    cmd += ["--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest), "-r", str(REQUIREMENTS)]
    if find_links:
        cmd += ["--no-index", "--find-links", find_links]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        why = [line for line in r.stderr.splitlines() if line.startswith("ERROR")] or r.stderr.splitlines()[-1:]
        where = f"in {find_links}" if find_links else "from the package index"
        raise PipelineError(f"pip found no wheels for Linux x86-64 Python {python} {where}: {' '.join(why)}")
    return sorted(p.name for p in dest.glob("*.whl"))


def wheels_line(python: str) -> str:
    """The one line export prints: which Python and platform the dataset's wheels are for."""
    if python == KAGGLE_PYTHON:
        return f"wheels for CPython {python}, Linux x86-64 (Kaggle's notebook image; --python 3.X for another)"
    return f"wheels for CPython {python}, Linux x86-64 (--python {python}; Kaggle's image runs {KAGGLE_PYTHON})"


def kaggle_username() -> str:
    """The Kaggle user the dataset belongs to, as the kaggle client would find it (without signing in)."""
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    folder = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    try:
        return json.loads((folder / "kaggle.json").read_text())["username"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def notebook(slug: str) -> dict:
    code = (
        "import glob, subprocess, sys\n"
        f"script = sorted(glob.glob('/kaggle/input/**/{SCRIPT}', recursive=True))[0]  # this dataset, where mounted\n"
        "subprocess.run([sys.executable, script, '--out', '/kaggle/working/submission.csv'], check=True)"
    )
    intro = (
        f"# Offline submission\nAdd the dataset `{slug}` and the competition as inputs (internet off), run all: "
        "the ensemble writes `/kaggle/working/submission.csv`."
    )
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": intro},
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": code},
    ]
    kernel = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return {"cells": cells, "metadata": {"kernelspec": kernel}, "nbformat": 4, "nbformat_minor": 5}


def readme(cfg: Config, slug: str, dataset_id: str, python: str, wheels: list[str]) -> str:
    return f"""# {cfg.experiment}: age and gender, offline on Kaggle

The ensemble of experiment `{cfg.experiment}` as an ONNX bundle (`bundle/`, its model card in `bundle/README.md`),
with what runs it without torch or internet: `pipeline/` (the pipeline's torch-free serving code), `wheels/`
(Linux x86-64, CPython {python}: {len(wheels)} wheels) and `{SCRIPT}`.

Upload (the official kaggle client; `-r zip` keeps the folders):

    kaggle datasets create -p runs/{cfg.experiment}/{KAGGLE_DIR} -r zip   # then: kaggle datasets version -p ... -r zip

Dataset id: `{dataset_id}` (dataset-metadata.json). In a notebook with the competition and this dataset as inputs
and the internet off, run `predict_submission.ipynb`, or:

    !python /kaggle/input/{slug}/{SCRIPT} [COMPETITION_DIR] [--out /kaggle/working/submission.csv]

COMPETITION_DIR defaults to `/kaggle/input/{cfg.data.competition or "<competition>"}`. Missing packages are installed
from `wheels/` with `pip --no-index`; on a Python other than {python} that is refused (export again with
`--python 3.X`), while a notebook that already holds them all runs on any Python from 3.10 to 3.13.
"""


def export_kaggle(cfg: Config, exp_dir: Path, bundle_dir: Path, python: str = KAGGLE_PYTHON, wheels: str = "") -> Path:
    """Write runs/<experiment>/kaggle/ around the ONNX bundle `bundle_dir` (replacing an older folder only once the
    new one is complete); `wheels`: a folder to take the wheels from instead of the package index. Returns it."""
    comp = load_competition(cfg)
    out = exp_dir / KAGGLE_DIR
    with atomic_folder(out) as tmp:
        (tmp / "wheels").mkdir()
        names = fetch_wheels(tmp / "wheels", python, wheels)
        print(wheels_line(python), flush=True)
        shutil.copytree(bundle_dir, tmp / "bundle")
        for name in SOURCES + DATA_FILES:
            (tmp / "pipeline" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PACKAGE / name, tmp / "pipeline" / name)
        shutil.copy2(PACKAGE / "serving" / "kaggle_entry.py", tmp / SCRIPT)
        d = cfg.data
        competition = {
            "competition": d.competition,
            "sample_submission": d.sample_submission,
            "test_csv": d.test_csv,
            "test_dir": d.test_dir,
            "age_col": comp.sub_age_col,
            "gender_col": comp.sub_gender_col,
            "wheels_python": python,  # predict_submission.py refuses to install them on another Python
        }
        (tmp / COMPETITION_FILE).write_text(json.dumps(competition, indent=1))
        slug = re.sub(r"[^a-z0-9]+", "-", f"{cfg.experiment}-age-gender".lower()).strip("-")[:50]
        user = kaggle_username()
        dataset_id = f"{user or 'YOUR-KAGGLE-USERNAME'}/{slug}"
        meta = {"title": slug.ljust(6, "-"), "id": dataset_id, "licenses": [{"name": "other"}]}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        (tmp / "predict_submission.ipynb").write_text(json.dumps(notebook(slug), indent=1))
        (tmp / "README.md").write_text(readme(cfg, slug, dataset_id, python, names))
    if not user:
        print(f"note: no Kaggle username found (KAGGLE_USERNAME, ~/.kaggle/kaggle.json): set the id in {out}/{META}")
    return out


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str]) -> int:
    """python -m pipeline.exporting.kaggle_export wheels DIR [PYTHON]: fetch the wheels once into DIR (run.sh does, so
    that the tests export offline with --wheels DIR)."""
    if len(argv) not in (2, 3) or argv[0] != "wheels":
        print("usage: python -m pipeline.exporting.kaggle_export wheels DIR [PYTHON]", file=sys.stderr)
        return 2
    dest = Path(argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    python = argv[2] if len(argv) == 3 else f"{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        print(f"{len(fetch_wheels(dest, python))} wheels in {dest}")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
