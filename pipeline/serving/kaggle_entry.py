"""Write the competition's submission with the exported ensemble, offline: no torch, no internet, no pickle.

    python predict_submission.py [COMPETITION_DIR] [--out submission.csv]

COMPETITION_DIR defaults to /kaggle/input/<competition>; --out to /kaggle/working/submission.csv on Kaggle. A
package it needs that is not installed is installed from the wheels beside this script (pip --no-index).
(export format=kaggle copies this file into the dataset as predict_submission.py.)"""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# module -> the package that brings it (requirements-kaggle.txt)
NEEDED = {
    "numpy": "numpy",
    "pandas": "pandas",
    "cv2": "opencv-python-headless",
    "onnxruntime": "onnxruntime",
    "tqdm": "tqdm",
}


def install_missing() -> None:
    missing = [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing {', '.join(missing)} from {HERE / 'wheels'} (offline)", flush=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(HERE / "wheels")]
        if subprocess.run([*pip, *missing]).returncode:
            sys.exit(f"error: pip could not install {', '.join(missing)} from {HERE / 'wheels'} (its message above)")
        importlib.invalidate_caches()


if __name__ == "__main__":
    install_missing()
    sys.path.insert(0, str(HERE))
    from pipeline.serving.kaggle_predict import main

    sys.exit(main(sys.argv[1:], HERE))
