"""Write the competition's submission with the exported ensemble, offline: no torch, no internet, no pickle.

    python predict_submission.py [COMPETITION_DIR] [--out submission.csv]

COMPETITION_DIR defaults to /kaggle/input/<competition>; --out to /kaggle/working/submission.csv on Kaggle. A
package it needs that is not installed is installed from the wheels beside this script (pip --no-index), which are
for one Python (competition.json's wheels_python): on another it stops instead.
(export --format kaggle copies this file into the dataset as predict_submission.py.)"""

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
# module -> the package that brings it (pipeline/exporting/kaggle-requirements.txt)
NEEDED = {
    "numpy": "numpy",
    "pandas": "pandas",
    "cv2": "opencv-python-headless",
    "onnxruntime": "onnxruntime",
    "tqdm": "tqdm",
}


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def wheels_python() -> str:
    """The Python the wheels beside this script are for, as export recorded it ("" if it cannot be read: the
    predictor itself then says what is wrong with competition.json)."""
    try:
        return str(json.loads((HERE / "competition.json").read_text()).get("wheels_python", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def install_missing() -> None:
    missing = [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return  # our own code is pure Python: any Python the package supports runs it
    wheels, running = wheels_python(), f"{sys.version_info[0]}.{sys.version_info[1]}"
    if wheels and wheels != running:
        fail(
            f"this dataset's wheels are for CPython {wheels}, but this notebook runs Python {running}: export again "
            f"with --python {running} (agegender export CONFIG --format kaggle --python {running})"
        )
    print(f"installing {', '.join(missing)} from {HERE / 'wheels'} (offline)", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(HERE / "wheels")]
    if subprocess.run([*pip, *missing]).returncode:
        fail(f"pip could not install {', '.join(missing)} from {HERE / 'wheels'} (its message above)")
    importlib.invalidate_caches()


if __name__ == "__main__":
    install_missing()
    sys.path.insert(0, str(HERE))
    from pipeline.serving.kaggle_predict import main

    sys.exit(main(sys.argv[1:], HERE))
