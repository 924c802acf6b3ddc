"""A Kaggle-layout competition's test side: which ids the submission has, in which order, under which column names,
and each id's image file. pandas only, so that the offline Kaggle predictor (serving/kaggle_predict.py) reads the
hidden test set exactly as the pipeline read the public one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import DataError, PipelineError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_COLS = ("image", "image_id", "img", "file", "filename", "file_name", "path", "full_path", "image_path", "id")
ID_COLS = ("id", "image_id", "image", "file", "filename", "file_name")


@dataclass
class TestSet:
    ids: list[str]  # each test id once, in the submission's order
    paths: list[str]  # its image file, "" when there is none
    submission_ids: list[str]  # the submission's rows (an id written twice in the sample submission stays twice)
    header: list[str] | None  # sample_submission.csv's columns, in order
    id_col: str = "id"
    age_col: str = "age"
    gender_col: str = "gender"


def read_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)  # ids such as "007" stay as written
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    return df


def detect_column(df: pd.DataFrame, wanted: str, candidates: tuple[str, ...], what: str, csv: Path) -> str:
    if wanted:
        if wanted not in df.columns:
            raise DataError(f"{csv}: no column {wanted!r}; columns are {list(df.columns)}")
        return wanted
    lower = {c.lower(): c for c in df.columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise DataError(f"{csv}: cannot find the {what} column (tried {', '.join(candidates)}); set it in config")


def resolve_image(value: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        p = folder / value
        if p.is_file():
            return p
        for ext in IMAGE_EXTS:
            q = folder / f"{value}{ext}"
            if q.is_file():
                return q
    return None


def read_test_set(
    root: Path, sample_submission: str, test_csv: str, test_dir: str, age_col: str, gender_col: str
) -> TestSet:
    """The test side of `root`: sample_submission.csv's rows and header (id first), else test.csv's ids with the
    training CSV's column names (`age_col`, `gender_col`); no test set gives empty lists."""
    sub_path, test_path = root / sample_submission, root / test_csv
    id_col, header = "id", None
    if sub_path.is_file():
        sub = read_csv(sub_path)
        id_col, header = sub.columns[0], list(sub.columns)
        lower = {c.lower(): c for c in sub.columns[1:]}
        age_col = lower.get("age", age_col)
        gender_col = lower.get("gender", lower.get("sex", gender_col))
        submission_ids = sub[id_col].astype(str).tolist()
    elif test_path.is_file():
        t = read_csv(test_path)
        id_col = detect_column(t, "", ID_COLS + IMAGE_COLS, "id", test_path)
        submission_ids = t[id_col].astype(str).tolist()
    else:
        submission_ids = []
    ids = list(dict.fromkeys(submission_ids))
    if len(ids) != len(submission_ids):
        dup = pd.Series(submission_ids)[pd.Series(submission_ids).duplicated()]
        print(
            f"WARNING: {len(dup)} duplicate test ids (e.g. {dup.iloc[0]!r}); each is predicted once and "
            "written on every row where the sample submission has it"
        )
    folders = [root / test_dir, root]
    paths = [str(p) if (p := resolve_image(tid, folders)) else "" for tid in ids]
    missing = [tid for tid, p in zip(ids, paths) if not p]
    if missing:
        print(
            f"WARNING: {len(missing)} test ids have no image (e.g. {missing[0]!r}); "
            "they still get a row in the submission, predicted from a blank image"
        )
    return TestSet(ids, paths, submission_ids, header, id_col, age_col, gender_col)


def shape_submission(t: TestSet, age: np.ndarray, gender: np.ndarray) -> pd.DataFrame:
    """The submission of the predictions for t.ids (in that order): one row per sample-submission row, in its order
    and under its header, validated. The one home of the submission's shape (the blend and the offline predictor)."""
    sub = pd.DataFrame({t.id_col: t.ids, t.age_col: age, t.gender_col: gender})
    sub = sub.set_index(t.id_col).loc[t.submission_ids].reset_index()
    if t.header and set(t.header) == set(sub.columns):
        sub = sub[t.header]
    validate_submission(sub, t.submission_ids, t.id_col, t.age_col, t.gender_col)
    return sub


def validate_submission(sub: pd.DataFrame, test_ids: list[str], id_col: str, age_col: str, gender_col: str) -> None:
    problems = []
    ids = sub[id_col].astype(str)
    if len(ids) != len(test_ids):
        problems.append(f"{len(ids)} rows for {len(test_ids)} expected")
    missing = set(test_ids) - set(ids)
    if missing:
        problems.append(f"{len(missing)} test ids missing, e.g. {sorted(missing)[0]!r}")
    extra = set(ids) - set(test_ids)
    if extra:
        problems.append(f"{len(extra)} ids not in the test set, e.g. {sorted(extra)[0]!r}")
    if not problems and ids.tolist() != list(test_ids):
        problems.append("rows are not in the test ids' order (duplicate or reordered ids)")
    if not np.isfinite(sub[age_col].to_numpy(dtype=float)).all():
        problems.append("non-finite ages")
    if not sub[gender_col].isin([0, 1]).all():
        problems.append("gender values other than 0/1")
    if problems:
        raise PipelineError("submission failed validation: " + "; ".join(problems))
