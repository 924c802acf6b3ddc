"""Calibrated answers from the cross-fitted OOF blend: age intervals by split-conformal prediction, adaptive to
the predicted age (Mondrian bins), and gender probabilities rescaled (temperature, Platt or isotonic, chosen by
out-of-fold log-loss). Every figure that says how well they work is cross-fitted: each fold's rows are scored with
what was fitted on the other folds only; what is saved (and bundled) is fitted on all OOF rows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression

AGE_BANDS = (0, 13, 18, 30, 45, 60)  # true-age bands of the coverage tables: 0-12, 13-17, 18-29, 30-44, 45-59, 60+
MIN_BIN_ROWS = 200  # a Mondrian bin of predicted ages holds at least this many rows (else it joins its neighbour)
PREDICTED_EDGES = (0, 6, 13, 18, 25, 30, 37, 45, 55, 65, 75)  # candidate lower edges of the predicted-age bins
ECE_BINS = 15
EPS = 1e-6


def conformal_bounds(residuals: np.ndarray, level: float) -> tuple[float, float]:
    """The split-conformal quantiles of signed residuals (true - predicted) for a two-sided interval at `level`:
    the k-th smallest with k = floor((n + 1) a/2) below and ceil((n + 1)(1 - a/2)) above, a = 1 - level; so
    the interval [pred + low, pred + high] covers a new exchangeable row with probability >= level."""
    r = np.sort(np.asarray(residuals, float))
    n, alpha = len(r), round(1 - level, 10)  # 1 - 0.8 is 0.19999...: floor() would be one rank off
    k_low = math.floor((n + 1) * alpha / 2)
    k_high = math.ceil((n + 1) * (1 - alpha / 2))
    low = r[k_low - 1] if k_low >= 1 else -np.inf
    high = r[k_high - 1] if k_high <= n else np.inf
    return float(low), float(high)


@dataclass
class AgeIntervals:
    """Per bin of predicted age (lower edges), the residual quantiles: interval = [age + low, age + high]."""

    level: float
    edges: list[float]
    low: list[float]
    high: list[float]

    def bounds(self, age: np.ndarray, max_age: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
        age = np.asarray(age, float)
        b = np.searchsorted(self.edges, age, side="right") - 1
        low = np.clip(age + np.asarray(self.low)[b], 0, max_age)
        high = np.clip(age + np.asarray(self.high)[b], 0, max_age)
        return low, high

    def to_dict(self) -> dict:
        return asdict(self)


def mondrian_edges(pred: np.ndarray, candidates=PREDICTED_EDGES, min_rows: int = MIN_BIN_ROWS) -> list[float]:
    """Lower edges of predicted-age bins, each holding at least min_rows rows (sparse bins join the one before)."""
    edges: list[float] = []
    for i, e in enumerate(candidates):
        upper = candidates[i + 1] if i + 1 < len(candidates) else np.inf
        n = int(((pred >= e) & (pred < upper)).sum())
        if not edges or n >= min_rows:
            edges.append(float(e))
    while len(edges) > 1 and int((pred >= edges[-1]).sum()) < min_rows:
        edges.pop()  # the last bin joins the one before it
    return edges


def fit_age_intervals(pred: np.ndarray, true: np.ndarray, level: float, adaptive: bool = True) -> AgeIntervals:
    """Split-conformal intervals from OOF rows: one pair of quantiles per bin of predicted age (adaptive), or one
    for all rows."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    edges = mondrian_edges(pred) if adaptive else [0.0]
    b = np.searchsorted(edges, pred, side="right") - 1
    pairs = [conformal_bounds(true[b == i] - pred[b == i], level) for i in range(len(edges))]
    return AgeIntervals(level, edges, [p[0] for p in pairs], [p[1] for p in pairs])


# --- gender: a probability people can read as one ---


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ece(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the row-weighted gap between mean probability and frequency, in equal-width
    bins of probability."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    b = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[b == i].mean() - y[b == i].mean()) * (b == i).mean() for i in range(bins) if (b == i).any()))


@dataclass
class GenderCalibration:
    """p -> the calibrated probability of code 1. method: temperature (a * logit), platt (a * logit + b), isotonic
    (the steps x -> y), or none."""

    method: str
    a: float = 1.0
    b: float = 0.0
    x: list[float] | None = None
    y: list[float] | None = None

    def __call__(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, float)
        if self.method == "isotonic":
            return np.interp(p, self.x, self.y)
        if self.method == "none":
            return p
        return 1 / (1 + np.exp(-(self.a * _logit(p) + self.b)))

    def to_dict(self) -> dict:
        return asdict(self)


def fit_gender(method: str, p: np.ndarray, y: np.ndarray) -> GenderCalibration:
    z, y = _logit(p), np.asarray(y, float)
    if method == "none":
        return GenderCalibration("none")
    if method == "isotonic":
        iso = IsotonicRegression(y_min=EPS, y_max=1 - EPS, out_of_bounds="clip").fit(p, y)
        return GenderCalibration("isotonic", x=iso.X_thresholds_.tolist(), y=iso.y_thresholds_.tolist())

    def loss(w):
        a, b = w[0], (w[1] if method == "platt" else 0.0)
        q = np.clip(1 / (1 + np.exp(-(a * z + b))), EPS, 1 - EPS)
        return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))

    w = minimize(loss, [1.0, 0.0] if method == "platt" else [1.0], method="L-BFGS-B").x
    return GenderCalibration(method, float(w[0]), float(w[1]) if method == "platt" else 0.0)


GENDER_METHODS = ("none", "temperature", "platt", "isotonic")


def cross_fitted(fit, score, folds: np.ndarray, *columns):
    """Each fold's rows scored by `score(model, rows)` with the model `fit(rows)` fitted on the other folds: an
    array of the per-row results in the rows' order."""
    out = None
    for k in np.unique(folds):
        test, train = folds == k, folds != k
        model = fit(*(c[train] for c in columns))
        part = score(model, *(c[test] for c in columns))
        if out is None:
            out = np.empty((len(folds), *np.shape(part)[1:]), dtype=np.asarray(part).dtype)
        out[test] = part
    return out
