"""folds.groups: planted copies of photos (re-encoded, resized, shifted) and planted persons stay on one side of every
fold and of the hold-out split; a copy with other labels is label noise."""

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import Config, DataConfig, FoldsConfig
from pipeline.core.errors import DataError
from pipeline.data.competition import load_competition
from pipeline.data.duplicates import image_hashes, near_duplicate_groups
from pipeline.data.folds import make_folds

N_PHOTOS = 60


def _photo(rng) -> np.ndarray:
    """A smooth random picture (blobs of colour): distinct pictures have distant perceptual hashes."""
    small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return cv2.resize(small, (96, 96), interpolation=cv2.INTER_CUBIC)


def _competition(root, conflict: bool = False):
    """N_PHOTOS photos, and copies of the first 12: JPEG re-encoded, resized, shifted by 2 px; a person column
    joining photos 20-29 in pairs. With conflict: an exact copy of photo 0 under another age."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    rows, copies = [], {}
    for i in range(N_PHOTOS):
        img = _photo(rng)
        cv2.imwrite(str(root / "train" / f"p{i}.png"), img)
        rows.append((f"p{i}.png", 20 + i % 50, i % 2, f"person{i // 2 if 20 <= i < 30 else i + 100}"))
        variants = {
            "jpg": (img, [cv2.IMWRITE_JPEG_QUALITY, 70], ".jpg"),
            "small": (cv2.resize(img, (80, 80), interpolation=cv2.INTER_AREA), [], ".png"),
            "shift": (np.roll(img, 1, axis=1), [], ".png"),
        }
        if i < 12:
            kind = list(variants)[i % 3]
            copy, flags, ext = variants[kind]
            name = f"p{i}_{kind}{ext}"
            cv2.imwrite(str(root / "train" / name), copy, flags)
            rows.append((name, 20 + i % 50, i % 2, f"person{i + 100}"))
            copies[name] = f"p{i}.png"
    if conflict:
        cv2.imwrite(str(root / "train" / "p0_again.png"), cv2.imread(str(root / "train" / "p0.png")))
        rows.append(("p0_again.png", 55, 0, "person100"))
    pd.DataFrame(rows, columns=["image", "age", "gender", "person"]).to_csv(root / "train.csv", index=False)
    return copies


def _cfg(root, tmp_path, groups, **data):
    return Config(
        data=DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), layout="kaggle", **data),
        folds=FoldsConfig(n_splits=4, groups=groups),
    )


def test_near_duplicates_group_every_planted_copy_and_nothing_else(tmp_path):
    root = tmp_path / "comp"
    copies = _competition(root)
    comp = load_competition(_cfg(root, tmp_path, "near_duplicates"))
    group = dict(zip(comp.train.id, comp.train.fold_group))
    assert all(group[c] == group[o] for c, o in copies.items())
    assert comp.train.fold_group.nunique() == N_PHOTOS  # each photo with its copy; no stranger joined
    assert comp.groups["groups"] == 12 and comp.groups["largest"] == 2 and comp.groups["label_noise"] == []
    folds = make_folds(comp.train, 4, 42, FoldsConfig().age_bins)
    fold = dict(zip(folds.id, folds.fold))
    assert all(fold[c] == fold[o] for c, o in copies.items())
    cached = image_hashes(comp.train.path.tolist(), str(tmp_path / "cache"))  # read back from the cache
    assert (cached.phash != 0).all() and np.array_equal(cached.groups, near_duplicate_groups(cached))


def test_a_person_column_keeps_each_person_in_one_fold_and_on_one_side_of_the_holdout(tmp_path):
    root = tmp_path / "comp"
    _competition(root)
    comp = load_competition(_cfg(root, tmp_path, "person", holdout=0.25))
    held, kept = comp.holdout_labels, comp.train
    assert len(held) and not set(held.fold_group) & set(kept.fold_group)
    folds = make_folds(kept, 4, 42, FoldsConfig().age_bins).assign(person=kept.fold_group.to_numpy())
    assert (folds.groupby("person").fold.nunique() == 1).all()
    assert kept.fold_group.duplicated().any()  # the planted pairs are there to be kept together
    with pytest.raises(DataError, match="folds.groups=subject: .*train.csv has no such column"):
        load_competition(_cfg(root, tmp_path, "subject"))


def test_copies_labelled_two_ways_are_reported_and_skipped_or_stop_the_run(tmp_path):
    root = tmp_path / "comp"
    _competition(root, conflict=True)
    comp = load_competition(_cfg(root, tmp_path, "near_duplicates"))
    assert comp.groups["label_noise"] == [["p0.png", "p0_again.png"]]
    assert {"p0.png", "p0_again.png"} <= {f for f, why in comp.skipped if "labelled otherwise" in why}
    assert "p0.png" not in set(comp.train.id) and "p0_jpg.jpg" in set(comp.train.id)  # a re-encoded copy: kept
    with pytest.raises(DataError, match=r"p0.png \(age 20, gender 0\), p0_again.png \(age 55, gender 0\): the same"):
        load_competition(_cfg(root, tmp_path, "near_duplicates", on_error="fail"))


def test_hash_distance_joins_chains_and_leaves_unreadable_files_alone():
    from pipeline.data.duplicates import Hashes

    phash = np.array([0b0, 0b11, 0b1111, 0b111111 << 30, 0b111111 << 20, 2**64 - 1, 0], np.uint64)
    mean = np.array([0, 0, 0, 0b111, 0, 0, 0], np.uint64)
    h = Hashes(phash, mean, np.array(["a", "b", "c", "d", "e", "f", ""]))
    groups = near_duplicate_groups(h)
    # 0-1-2: 2 bits apart each; 4 (6 bits from 0, the same mean hash) a shifted copy; 3: 6 bits but 3 mean bits off
    assert groups[0] == groups[1] == groups[2] == groups[4] and len({groups[0], groups[3], groups[5], groups[6]}) == 4


def test_the_report_shows_the_groups_with_thumbnails_of_example_pairs(tmp_path):
    from pipeline.inference.report import _groups_html

    root = tmp_path / "comp"
    _competition(root, conflict=True)
    comp = load_competition(_cfg(root, tmp_path, "near_duplicates"))
    page = _groups_html(comp.report()["groups"])
    assert "11 groups of near-duplicate images (22 images, the largest 2)" in page
    assert page.count("<img class=thumb src='data:image/jpeg;base64,") == 2 * len(comp.groups["examples"]) == 12
    assert "1 pictures had copies labelled otherwise" in page
