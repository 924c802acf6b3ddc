"""Competition metrics. score = harmonic mean of (1 - min(RMSE, 30)/30) and gender macro-F1."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, root_mean_squared_error

# Every metric `evaluate` returns, in table order, and its direction: the one list of metric names.
HIGHER_IS_BETTER = {"mae": False, "rmse": False, "accuracy": True, "f1": True, "score": True}
METRICS = tuple(HIGHER_IS_BETTER)


def competition_score(rmse: float, f1: float) -> float:
    age_part = 1.0 - min(rmse, 30.0) / 30.0
    return 0.0 if age_part + f1 == 0 else 2 * age_part * f1 / (age_part + f1)


def evaluate(age_true, age_pred, gender_true, gender_prob, threshold: float = 0.5) -> dict[str, float]:
    gender_pred = (np.asarray(gender_prob) >= threshold).astype(int)
    rmse = float(root_mean_squared_error(age_true, age_pred))
    f1 = float(f1_score(gender_true, gender_pred, average="macro"))
    return {
        "mae": float(mean_absolute_error(age_true, age_pred)),
        "rmse": rmse,
        "accuracy": float(accuracy_score(gender_true, gender_pred)),
        "f1": f1,
        "score": competition_score(rmse, f1),
    }


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new > best if HIGHER_IS_BETTER[metric] else new < best
