"""Stratified (group) K-fold over age bins x gender, written once to folds/<dataset>-k<K>-s<seed>[-g<groups>].csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ..core.config import Config
from ..core.errors import PipelineError
from ..core.files import write_csv
from ..core.layout import folds_file
from .competition import Competition, age_gender_strata, merge_small_strata


def folds_path(cfg: Config, name: str) -> Path:
    return folds_file(name, cfg.folds.n_splits, cfg.folds.seed, cfg.folds.groups)


def make_folds(train: pd.DataFrame, n_splits: int, seed: int, bins: list[float]) -> pd.DataFrame:
    """Stratified K-fold; with a fold_group column (folds.groups) a stratified group K-fold: every group in one fold."""
    strata = age_gender_strata(train.age.to_numpy(), train.gender.to_numpy(), bins)
    strata = merge_small_strata(strata, n_splits)  # a stratum smaller than K cannot be split K ways
    fold = np.zeros(len(train), np.int64)
    if "fold_group" in train.columns:
        groups = train.fold_group.to_numpy()
        if len(np.unique(groups)) < n_splits:
            raise PipelineError(f"folds.groups: {len(np.unique(groups))} groups cannot fill {n_splits} folds")
        splits = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(fold, strata, groups)
    else:
        splits = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(fold, strata)
    for k, (_, val) in enumerate(splits):
        fold[val] = k
    return pd.DataFrame({"id": train.id.to_numpy(), "fold": fold})


def ensure_folds(cfg: Config, comp: Competition) -> pd.DataFrame:
    """Create the folds file, or reuse the existing one after checking it covers exactly these ids."""
    path = folds_path(cfg, comp.name)
    if path.is_file():
        folds = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
        if set(folds.id) != set(comp.train.id):
            raise PipelineError(
                f"{path} was made for different training ids ({len(folds)} ids in the file, {len(comp.train)} now). "
                "Folds are never changed silently: delete the file to re-split, or set data.name to a new dataset name"
            )
        print(f"folds: reusing {path}")
        return folds
    folds = make_folds(comp.train, cfg.folds.n_splits, cfg.folds.seed, cfg.folds.age_bins)
    write_csv(folds, path)
    sizes = folds.fold.value_counts().sort_index().tolist()
    print(f"folds: wrote {path} ({len(folds)} ids, fold sizes {sizes})")
    return folds
