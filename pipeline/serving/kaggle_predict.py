"""The submission of a competition folder from an ONNX bundle, offline and without torch: what the Kaggle dataset
of `export --format kaggle` runs (its predict_submission.py calls `main`) and what export checks a bundle with.

The hidden test set is read as the pipeline read the public one (data/test_set.py): the sample submission's ids,
order and column names; each image decoded, face-cropped (face_crop=detect) and squared at its own resolution,
then the bundle's resize, zoom, TTA, fold average and blend; gender as the competition's 0/1 code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import DataError, PipelineError
from ..core.files import write_csv
from ..data.faces import Face, detect_all, native_face
from ..data.test_set import read_test_set, shape_submission

COMPETITION_FILE = "competition.json"  # beside the bundle: the slug and the test side's file and column names
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")


def predict_paths(bundle, paths: list[str], fit: str, found: list[Face | None] | None = None, chunk: int = 256):
    """bundle.predict on image files, `chunk` at a time; an unreadable or missing file is predicted from a blank
    image, as the pipeline does."""
    preds = []
    for start in range(0, len(paths), chunk):
        faces = []
        for i in range(start, min(start + chunk, len(paths))):
            try:
                faces.append(native_face(paths[i], fit, found[i] if found else None))
            except DataError:
                faces.append(np.zeros((8, 8, 3), np.uint8))
        preds.append(bundle.predict(faces))
    return pd.concat(preds, ignore_index=True)


def submission(bundle, root: Path, names: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The competition folder `root`'s submission: one row per sample-submission row, in its order and columns; and
    the bundle's predictions (with their intervals, from a calibrated bundle) by test id."""
    t = read_test_set(
        root, names["sample_submission"], names["test_csv"], names["test_dir"], names["age_col"], names["gender_col"]
    )
    if not t.ids:
        raise PipelineError(f"{root}: no test set here (no {names['sample_submission']} or {names['test_csv']})")
    found = detect_all(t.paths, "faces") if bundle.face_crop == "detect" else None
    pred = predict_paths(bundle, t.paths, bundle.info.fit, found)
    return shape_submission(t, pred.age.to_numpy(), pred.gender.to_numpy()), pred.assign(id=t.ids).set_index("id")


def default_competition_dir(slug: str, sample_submission: str, kaggle_input: Path = KAGGLE_INPUT) -> Path:
    """/kaggle/input/<slug>, else the first folder under /kaggle/input holding the sample submission (wherever
    Kaggle mounted the competition), else the current folder."""
    if slug and (kaggle_input / slug).is_dir():
        return kaggle_input / slug
    found = sorted(kaggle_input.glob(f"*/{sample_submission}")) + sorted(kaggle_input.glob(f"*/*/{sample_submission}"))
    return found[0].parent if found else Path(".")


def _names(path: Path) -> dict:
    keys = ("competition", "sample_submission", "test_csv", "test_dir", "age_col", "gender_col")
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: missing or damaged ({e}); export the dataset again") from None
    if not isinstance(names, dict) or any(k not in names for k in keys):
        raise PipelineError(f"{path}: not this exporter's file (it needs {', '.join(keys)}); export again")
    return names


def main(argv: list[str], here: Path) -> int:
    """predict_submission.py [COMPETITION_DIR] [--out submission.csv]; `here`: the exported folder."""
    from .bundle import NAME_THEM, load_bundle

    p = argparse.ArgumentParser(prog="predict_submission.py", description="Write the submission, offline.")
    p.add_argument("competition_dir", nargs="?", help="default: /kaggle/input/<competition>")
    default_out = KAGGLE_WORKING / "submission.csv" if KAGGLE_WORKING.is_dir() else Path("submission.csv")
    p.add_argument("--out", default=str(default_out), help=f"default: {default_out}")
    p.add_argument(
        "--details",
        metavar="CSV",
        help="also write every test image's age, its interval (age_low, age_high), the calibrated gender probability "
        "and the gender decision, by id (not a submission)",
    )
    args = p.parse_args(argv)
    try:
        names = _names(here / COMPETITION_FILE)
        root = Path(args.competition_dir or default_competition_dir(names["competition"], names["sample_submission"]))
        t0 = time.perf_counter()
        bundle = load_bundle(here / "bundle")
        if not bundle.labels_known:
            print(f"note: {NAME_THEM}", file=sys.stderr)
        sub, pred = submission(bundle, root, names)
        write_csv(sub, args.out)
        if args.details:
            write_csv(pred.drop(columns="gender_label").reset_index(), args.details, "%.4f")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(f"{args.out}: {len(sub)} rows from {root} in {seconds:.1f}s ({len(sub) / seconds:.1f} images/s)")
    return 0
