"""Find the competition's images and labels (Kaggle CSV layout or UTKFace file names), check them, and hold out a
labelled test split when there is no test set."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from ..core.config import Config, DataConfig
from ..core.errors import DataError
from .download import download_competition, needs_download
from .duplicates import CONFLICT, group_summary, image_hashes, label_conflicts
from .test_set import IMAGE_COLS, IMAGE_EXTS, TestSet, detect_column, read_csv, read_test_set, resolve_image

UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_\d+")


@dataclass
class FaceCropCounts:
    """data.face_crop=detect: the readable images searched for a face, and the files without one (kept whole)."""

    train_images: int
    test_images: int
    train_no_face: list[str]
    test_no_face: list[str]


@dataclass
class Competition:
    """Training rows (id, path, age, gender[, group]) and test rows (id, path) of one competition."""

    name: str
    train: pd.DataFrame
    test: pd.DataFrame
    sub_id_col: str = "id"  # the submission's column names (sample_submission.csv's header)
    sub_age_col: str = "age"
    sub_gender_col: str = "gender"
    submission_ids: list[str] | None = None  # the submission's rows in order (default: test ids)
    submission_header: list[str] | None = None  # sample_submission.csv's columns, in order
    holdout_labels: pd.DataFrame | None = None  # labels of a held-out test split; read only after submitting
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or row, reason)
    face_crop: FaceCropCounts | None = None  # set by prepare_images with data.face_crop=detect
    groups: dict | None = None  # folds.groups: what was found (duplicates.group_summary), for the data report

    def test_set(self) -> TestSet:
        """The test side as the submission sees it: ids in order, the submission's rows and column names."""
        ids = self.test.id.tolist()
        return TestSet(
            ids,
            self.test.path.tolist(),
            self.submission_ids or ids,
            self.submission_header,
            self.sub_id_col,
            self.sub_age_col,
            self.sub_gender_col,
        )

    def report(self) -> dict:
        reasons: dict[str, int] = {}
        for _, why in self.skipped:
            reasons[why] = reasons.get(why, 0) + 1
        out = {
            "dataset": self.name,
            "train_images": len(self.train),
            "test_images": len(self.test),
            "skipped": len(self.skipped),
            "skipped_by_reason": reasons,
            "skipped_files": [{"file": f, "reason": r} for f, r in self.skipped],
            "groups": self.groups,
        }
        if self.face_crop:
            c = self.face_crop
            out["face_crop"] = {
                "mode": "detect",
                "train_images": c.train_images,
                "train_no_face": len(c.train_no_face),
                "test_images": c.test_images,
                "test_no_face": len(c.test_no_face),
                "no_face_files": [{"file": f, "split": "train"} for f in c.train_no_face]
                + [{"file": f, "split": "test"} for f in c.test_no_face],
            }
        return out

    def face_crop_line(self) -> str:
        """The run's one line on face_crop=detect: how many images had no face and were kept whole."""
        c = self.face_crop
        if c is None:
            return ""
        test = f" and {len(c.test_no_face)} of {c.test_images} test images" if c.test_images else ""
        return (
            f"data: face_crop=detect: no face found in {len(c.train_no_face)} of {c.train_images} "
            f"training images{test} (kept whole)"
        )


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """`age_gender_race_date.jpg.chip.jpg` -> (age, gender, race); None when the name does not parse."""
    m = UTK_NAME.match(name)
    if not m:
        return None
    age, gender, race = (int(g) for g in m.groups())
    if gender not in (0, 1):
        return None
    return age, gender, race


def detect_layout(root: Path, cfg: DataConfig) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    if (root / cfg.train_csv).is_file():
        return "kaggle"
    if any(parse_utkface_name(p.name) for p in _images_in(root, limit=50)):
        return "utkface"
    raise DataError(
        f"{root}: cannot tell the layout; expected {cfg.train_csv} (Kaggle layout) "
        "or UTKFace-style image names (age_gender_race_date.jpg.chip.jpg)"
    )


def _images_in(folder: Path, limit: int | None = None) -> list[Path]:
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTS):
            out.append(Path(entry.path))
            if limit and len(out) >= limit:
                break
    return out


def load_competition(cfg: Config) -> Competition:
    d = cfg.data
    root = Path(d.root)
    if needs_download(d):
        download_competition(d)
    if not root.is_dir():
        raise DataError(f"data.root={d.root}: folder not found")
    name = d.name or root.resolve().name
    layout = detect_layout(root, d)
    group_col = "" if cfg.folds.groups in ("none", "near_duplicates") else cfg.folds.groups
    if layout == "utkface" and group_col:
        raise DataError(f"folds.groups={group_col}: UTKFace file names hold no such column; use near_duplicates")
    comp = _load_utkface(root, name) if layout == "utkface" else _load_kaggle(root, name, d, group_col)
    if comp.skipped and d.on_error == "fail":
        where, why = comp.skipped[0]
        raise DataError(f"{where}: {why} ({len(comp.skipped)} such; data.on_error=skip skips them)")
    train, bad = _check_labels(comp.train, d)
    if d.limit:
        train = train.iloc[: d.limit].reset_index(drop=True)
    comp = replace(comp, train=train, skipped=[*comp.skipped, *bad])
    comp = _with_groups(comp, cfg)
    _check_enough(comp, root, cfg.folds.n_splits)
    if len(comp.test) == 0 and d.holdout > 0:
        comp = _hold_out(comp, d.holdout, cfg.folds.seed, cfg.folds.age_bins)
        _check_enough(comp, root, cfg.folds.n_splits)
    return comp


def _with_groups(comp: Competition, cfg: Config) -> Competition:
    """comp.train with its `fold_group` column (folds.groups: near-duplicate photos, or the train CSV's column), and
    without the copies of a picture labelled two ways (data.on_error=skip; fail stops)."""
    how = cfg.folds.groups
    if how != "near_duplicates":
        return comp  # none, or a column the loader read as fold_group
    train = comp.train
    hashes = image_hashes(train.path.tolist(), cfg.data.cache_folder)
    conflicts = label_conflicts(train, hashes)
    if conflicts:
        first = train.iloc[conflicts[0]]
        labels = ", ".join(f"{r.id} (age {r.age:g}, gender {r.gender})" for r in first.itertuples())
        n = sum(map(len, conflicts))
        if cfg.data.on_error == "fail":
            raise DataError(
                f"{labels}: {CONFLICT}; {len(conflicts)} such pictures ({n} rows; data.on_error=skip skips them)"
            )
        print(f"data: skipped {n} copies of {len(conflicts)} pictures labelled two ways (label noise), e.g. {labels}")
    drop = np.zeros(len(train), bool)
    drop[[i for rows in conflicts for i in rows]] = True
    groups = hashes.groups
    train = train.assign(fold_group=groups)
    summary = {
        **group_summary(train[~drop], groups[~drop]),
        "label_noise": [train.id.iloc[r].tolist() for r in conflicts],
    }
    print(
        f"groups: {summary['groups']} groups of near-duplicate images ({summary['images_in_groups']} images, the "
        f"largest {summary['largest']}), each kept on one side of every fold and of the hold-out split"
    )
    skipped = [*comp.skipped, *[(i, CONFLICT) for i in train.id[drop]]]
    return replace(comp, train=train[~drop].reset_index(drop=True), skipped=skipped, groups=summary)


def _check_enough(comp: Competition, root: Path, n_splits: int) -> None:
    if len(comp.train) < n_splits * 2:
        raise DataError(f"{root}: only {len(comp.train)} usable training images; need at least {n_splits * 2}")


def _load_utkface(root: Path, name: str) -> Competition:
    rows, skipped = [], []
    for p in _images_in(root):
        parsed = parse_utkface_name(p.name)
        if parsed is None:
            skipped.append((p.name, "file name does not parse as age_gender_race_date"))
            continue
        rows.append((p.name, str(p), *parsed))
    train = pd.DataFrame(rows, columns=["id", "path", "age", "gender", "group"])
    test = pd.DataFrame(columns=["id", "path"])
    return Competition(name, train, test, skipped=skipped)


def _load_kaggle(root: Path, name: str, d: DataConfig, group_col: str = "") -> Competition:
    train_csv = root / d.train_csv
    df = read_csv(train_csv)
    if df.empty:
        raise DataError(f"{train_csv}: has a header but no rows")
    if group_col and group_col not in df.columns:
        raise DataError(f"folds.groups={group_col}: {train_csv} has no such column (it has: {', '.join(df.columns)})")
    image_col = detect_column(df, d.image_col, IMAGE_COLS, "image", train_csv)
    train_age_col = detect_column(
        df, d.age_col if d.age_col in df.columns else "", (d.age_col.lower(), "age"), "age", train_csv
    )
    train_gender_col = detect_column(
        df,
        d.gender_col if d.gender_col in df.columns else "",
        (d.gender_col.lower(), "gender", "sex"),
        "gender",
        train_csv,
    )
    folders = [root / d.train_dir, root]
    rows, skipped = [], []
    for i, value in enumerate(df[image_col].astype(str)):
        path = resolve_image(value, folders)
        if path is None:
            skipped.append((f"{train_csv.name} row {i + 2} ({value})", "image file not found"))
            continue
        rows.append((value, str(path), df.at[i, train_age_col], df.at[i, train_gender_col]))
        if group_col:
            rows[-1] += (str(df.at[i, group_col]),)
    train = pd.DataFrame(rows, columns=["id", "path", "age", "gender", *(["fold_group"] if group_col else [])])

    t = read_test_set(root, d.sample_submission, d.test_csv, d.test_dir, train_age_col, train_gender_col)
    test = pd.DataFrame({"id": t.ids, "path": t.paths}, columns=["id", "path"])
    return Competition(
        name, train, test, t.id_col, t.age_col, t.gender_col, t.submission_ids, t.header, skipped=skipped
    )


def _check_labels(train: pd.DataFrame, d: DataConfig) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Numeric ages and 0/1 genders; returns the good rows and (id, reason) of the bad ones."""
    age = pd.to_numeric(train.age, errors="coerce")
    gender = pd.to_numeric(train.gender, errors="coerce")
    bad = []
    for i in range(len(train)):
        a, g = age.iat[i], gender.iat[i]
        if not np.isfinite(a):
            bad.append((i, f"age {train.age.iat[i]!r} is not a number"))
        elif a < 0 or a > d.max_age:
            bad.append((i, f"age {a:g} outside [0, {d.max_age:g}] (data.max_age)"))
        elif g not in (0, 1):
            bad.append((i, f"gender {train.gender.iat[i]!r} is not 0 or 1"))
    dup = train.id.duplicated(keep="first")
    bad += [(i, "duplicate id") for i in np.flatnonzero(dup.to_numpy())]
    if bad and d.on_error == "fail":
        i, why = bad[0]
        raise DataError(f"training row {train.id.iat[i]!r}: {why} ({len(bad)} bad rows; data.on_error=skip skips them)")
    drop = sorted({i for i, _ in bad})
    out = train.assign(age=age.astype("float32"), gender=gender.fillna(-1).astype("int64"))
    return out.drop(index=drop).reset_index(drop=True), [(train.id.iat[i], why) for i, why in bad]


def age_gender_strata(age: np.ndarray, gender: np.ndarray, bins: list[float]) -> np.ndarray:
    return np.digitize(age, bins[1:]) * 2 + gender


def merge_small_strata(strata: np.ndarray, min_count: int, max_strata: int | None = None) -> np.ndarray:
    """Merge every stratum with fewer than `min_count` members (smallest first) into the nearest age bin of
    the same gender, also while there are more than `max_strata` strata. Returns a new array."""
    strata = strata.copy()
    while True:
        counts = pd.Series(strata).value_counts()
        too_many = max_strata is not None and len(counts) > max_strata
        if len(counts) == 1 or (counts.min() >= min_count and not too_many):
            return strata
        s = counts.idxmin()
        others = [o for o in counts.index if o != s]
        target = min(others, key=lambda o: (o % 2 != s % 2, abs(o // 2 - s // 2)))
        strata[strata == s] = target


def _hold_out(comp: Competition, frac: float, seed: int, bins: list[float]) -> Competition:
    """A new Competition whose test set is a stratified `frac` of the training rows, labels kept aside."""
    train = comp.train
    n_held = int(np.ceil(frac * len(train)))  # as train_test_split rounds it
    strata = age_gender_strata(train.age.to_numpy(), train.gender.to_numpy(), bins)
    # each stratum needs a member on both sides, and each side at least one member of every stratum
    strata = merge_small_strata(strata, 2, max_strata=min(n_held, len(train) - n_held))
    if "fold_group" in train.columns:  # a group on one side only: the held fold of a stratified group K-fold
        splitter = StratifiedGroupKFold(n_splits=max(2, round(1 / frac)), shuffle=True, random_state=seed)
        keep, held = next(splitter.split(np.zeros(len(train)), strata, train.fold_group.to_numpy()))
    else:
        keep, held = train_test_split(np.arange(len(train)), test_size=frac, random_state=seed, stratify=strata)
    held_df = train.iloc[np.sort(held)].reset_index(drop=True)
    return replace(
        comp,
        train=train.iloc[np.sort(keep)].reset_index(drop=True),
        test=held_df[["id", "path"]].copy(),
        holdout_labels=held_df,
    )
