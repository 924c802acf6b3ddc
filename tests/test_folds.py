import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.competition import load_competition, merge_small_strata
from pipeline.data.folds import ensure_folds, folds_path, make_folds


def _labels(n=600, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": [f"i{i}" for i in range(n)],
            "age": rng.integers(1, 90, n).astype(float),
            "gender": rng.integers(0, 2, n),
        }
    )


def test_folds_are_stratified_by_age_bin_and_gender():
    train = _labels()
    bins = [0, 5, 12, 18, 25, 32, 40, 50, 60, 75]
    folds = make_folds(train, 5, 42, bins)
    assert sorted(folds.fold.unique()) == [0, 1, 2, 3, 4]
    assert folds.fold.value_counts().max() - folds.fold.value_counts().min() <= 1
    strata = np.digitize(train.age, bins[1:]) * 2 + train.gender
    for s in np.unique(strata):
        per_fold = folds.fold[strata == s].value_counts().reindex(range(5), fill_value=0)
        assert per_fold.max() - per_fold.min() <= 1  # each age-bin x gender cell spread evenly


def test_folds_are_reproducible_and_seeded():
    train = _labels()
    a = make_folds(train, 5, 42, [0, 20, 40, 60])
    b = make_folds(train, 5, 42, [0, 20, 40, 60])
    c = make_folds(train, 5, 7, [0, 20, 40, 60])
    assert a.equals(b) and not a.equals(c)


def test_folds_file_written_once_and_never_changed_silently(demo_root, workdir):
    cfg = load_config(None, [f"data.root={demo_root}", "folds.n_splits=3", "folds.seed=5"])
    comp = load_competition(cfg)
    first = ensure_folds(cfg, comp)
    path = folds_path(cfg, comp.name)
    assert path.name == "comp-k3-s5.csv" and path.is_file()
    before = path.read_bytes()
    again = ensure_folds(cfg, comp)
    assert again.equals(first) and path.read_bytes() == before
    comp.train = comp.train.iloc[:-5]
    with pytest.raises(PipelineError, match="different training ids"):
        ensure_folds(cfg, comp)
    assert path.read_bytes() == before


def test_small_strata_merge_into_the_nearest_age_bin_of_the_same_gender():
    # stratum = age bin * 2 + gender: bin 3 has one woman (7), bin 4 one man (8)
    strata = np.array([0] * 5 + [1] * 5 + [2] * 5 + [5] * 5 + [7] + [8])
    merged = merge_small_strata(strata, 2)
    assert merged.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [5] * 5 + [5] + [2]
    assert strata[-1] == 8  # a new array; the input is untouched
    assert np.array_equal(merge_small_strata(strata, 1), strata)
    assert len(np.unique(merge_small_strata(merged, 1, max_strata=2))) == 2


def test_folds_cope_with_one_image_strata():
    train = _labels(40)
    train.loc[0, ["age", "gender"]] = [99.0, 1]  # alone in its age bin x gender
    folds = make_folds(train, 5, 0, [0, 20, 40, 60, 75])
    assert sorted(folds.fold.value_counts()) == [8] * 5
