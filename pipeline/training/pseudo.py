"""Pseudo-labels: a model (`models[].pseudo_labels: TEACHER`) also trains on the test images, labelled by an earlier
model's predictions. Fold k uses the teacher's fold-k predictions only: that model never trained on fold k's
validation rows, so nothing about them reaches the student and its OOF rows stay out-of-fold. Test labels are
never read. The labels are copied into the student's fold folder first (pseudo_labels.csv: what it trained on),
so a fold job needs nothing outside its own folder (Ray workers without a shared file system)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..core.config import ModelConfig
from ..core.errors import PipelineError
from ..core.files import atomic_path
from ..core.layout import PREDICT_DONE, PSEUDO_LABELS, TEST, TRAIN_DONE, fold_dir


def stage_pseudo_labels(exp_dir: Path, m: ModelConfig, k: int) -> None:
    """Copy the teacher's fold-k test predictions into the student's fold folder, unless already there."""
    out = fold_dir(exp_dir, m.name, k)
    if not m.pseudo_labels or (out / PSEUDO_LABELS).is_file() or (out / TRAIN_DONE).is_file():
        return
    teacher = fold_dir(exp_dir, m.pseudo_labels, k)
    if not (teacher / PREDICT_DONE).is_file():
        raise PipelineError(
            f"{m.name} fold {k} trains on pseudo-labels from {m.pseudo_labels}, whose fold {k} has no test "
            f"predictions in {teacher}: run the train and predict stages for {m.pseudo_labels} first"
        )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PSEUDO_LABELS) as tmp:
        shutil.copyfile(teacher / TEST, tmp)


class TrainingRows(NamedTuple):
    """Images, the rows of them that train, and every image's labels (age in years, gender 0/1 or a probability)."""

    images: np.ndarray
    rows: np.ndarray
    age: np.ndarray
    gender: np.ndarray


def with_pseudo_labels(out: Path, test_ids: np.ndarray, test_images: np.ndarray, train: TrainingRows) -> TrainingRows:
    """`train` with the test images appended as rows len(train.images)..: their ages and gender probabilities (soft
    targets) from out/pseudo_labels.csv."""
    path = out / PSEUDO_LABELS
    labels = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    if len(labels) != len(test_ids) or not np.array_equal(labels.id.to_numpy(), np.asarray(test_ids, str)):
        raise PipelineError(f"{path}: its ids are not the test images' ids in order; delete it to copy it afresh")
    if not np.isfinite(labels[["age", "gender_prob"]].to_numpy(float)).all():
        raise PipelineError(f"{path}: non-finite ages or gender probabilities")
    return TrainingRows(
        np.concatenate([train.images, test_images]),
        np.concatenate([train.rows, len(train.images) + np.arange(len(labels))]),
        np.concatenate([train.age, labels.age.to_numpy(np.float32)]),
        np.concatenate([train.gender, labels.gender_prob.to_numpy(np.float32).clip(0, 1)]),
    )
