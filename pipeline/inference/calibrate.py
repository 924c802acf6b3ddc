"""Fit the calibration (core/calibration.py) on the cross-fitted OOF blend, and measure it: age intervals by
split-conformal prediction, adaptive to the predicted age (Mondrian bins), and the gender rescaling (none,
temperature, Platt or isotonic, chosen by out-of-fold log-loss). Every figure is cross-fitted: each fold's rows are
scored with what was fitted on the other folds only; what is saved (and bundled) is fitted on all OOF rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression

from ..core.calibration import EPS, AgeIntervals, Calibration, GenderRescaling, min_age_answer, sigmoid
from ..core.choices import GENDER_METHODS

AGE_BANDS = (0, 13, 18, 30, 45, 60)  # true-age bands of the coverage tables: 0-12, 13-17, 18-29, 30-44, 45-59, 60+
MIN_BIN_ROWS = 200  # a Mondrian bin of predicted ages holds at least this many rows (else it joins its neighbour)
PREDICTED_EDGES = (0, 6, 13, 18, 25, 30, 37, 45, 55, 65, 75)  # candidate lower edges of the predicted-age bins
ECE_BINS = 15
ISOTONIC_FLOOR = 1e-3


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


def mondrian_edges(pred: np.ndarray, candidates=PREDICTED_EDGES, min_rows: int = MIN_BIN_ROWS) -> list[float]:
    """Lower edges of predicted-age bins, the first at candidates[0]: each bin is closed at the first candidate
    edge where it holds min_rows rows, and a last bin with fewer joins the one before (so every bin holds at least
    min_rows rows when there are that many)."""
    pred = np.asarray(pred, float)
    edges = [float(candidates[0])]
    for upper in candidates[1:]:
        if int(((pred >= edges[-1]) & (pred < upper)).sum()) >= min_rows:
            edges.append(float(upper))
    while len(edges) > 1 and int((pred >= edges[-1]).sum()) < min_rows:
        edges.pop()
    return edges


def fit_age_intervals(pred: np.ndarray, true: np.ndarray, level: float, adaptive: bool = True) -> AgeIntervals:
    """Split-conformal intervals from OOF rows: one pair of quantiles per bin of predicted age (adaptive), or one
    for all rows. A bin too small for a finite quantile at `level` gets the widest residuals it has (and the
    coverage figures show it)."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    edges = mondrian_edges(pred) if adaptive else [0.0]
    b = np.searchsorted(edges, pred, side="right") - 1
    pairs = []
    for i in range(len(edges)):
        r = true[b == i] - pred[b == i]
        if not len(r):  # no rows at all
            raise ValueError("no rows to fit age intervals on")
        low, high = conformal_bounds(r, level)
        pairs.append((low if np.isfinite(low) else float(r.min()), high if np.isfinite(high) else float(r.max())))
    return AgeIntervals(level, edges, [p[0] for p in pairs], [p[1] for p in pairs])


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> list[list[float]]:
    """[mean probability, frequency of code 1, rows] per non-empty equal-width bin of probability."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    b = np.minimum((p * bins).astype(int), bins - 1)
    return [
        [float(p[b == i].mean()), float(y[b == i].mean()), int((b == i).sum())] for i in range(bins) if (b == i).any()
    ]


def ece(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the row-weighted gap between mean probability and frequency, in equal-width
    bins of probability."""
    return float(sum(abs(mp - f) * n for mp, f, n in reliability(y, p, bins)) / len(p))


def fit_gender(method: str, z: np.ndarray, y: np.ndarray) -> GenderRescaling:
    """The rescaling of blended log-odds z that minimises log-loss on (z, y)."""
    z, y = np.asarray(z, float), np.asarray(y, float)
    if method == "none":
        return GenderRescaling("none")
    if method == "isotonic":
        # bounded away from 0 and 1: an end block of one class would otherwise promise certainty
        iso = IsotonicRegression(y_min=ISOTONIC_FLOOR, y_max=1 - ISOTONIC_FLOOR, out_of_bounds="clip").fit(
            sigmoid(z), y
        )
        return GenderRescaling("isotonic", x=iso.X_thresholds_.tolist(), y=iso.y_thresholds_.tolist())

    def loss(w):
        return log_loss(y, sigmoid(w[0] * z + (w[1] if method == "platt" else 0.0)))

    w = minimize(loss, [1.0, 0.0] if method == "platt" else [1.0], method="L-BFGS-B").x
    return GenderRescaling(method, float(w[0]), float(w[1]) if method == "platt" else 0.0)


def out_of_fold(fit, score, folds: np.ndarray, *columns):
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


def age_bin(age: pd.Series, bins: list[float]) -> pd.Series:
    """Each age's bin, labelled like "5-11" (bins are the lower edges, as folds.age_bins; the last is open)."""
    edges = [-np.inf, *bins[1:], np.inf]
    labels = [f"{lo:g}-{hi - 1:g}" for lo, hi in zip(bins, bins[1:])] + [f"{bins[-1]:g}+"]
    return pd.cut(age, edges, right=False, labels=labels).rename("age")


def _coverage(keys: np.ndarray, covered: np.ndarray, width: np.ndarray, order=None) -> dict[str, dict[str, float]]:
    out = {}
    for key in order or sorted(set(keys.tolist()), key=str):
        part = keys == key
        if part.any():
            out[str(key)] = {
                "rows": int(part.sum()),
                "coverage": float(covered[part].mean()),
                "width": float(width[part].mean()),
            }
    return out


def figures(
    true_age: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    y_gender: np.ndarray,
    p_before: np.ndarray,
    p_after: np.ndarray,
    min_age: float,
    group: np.ndarray | None = None,
) -> dict[str, Any]:
    """How well the calibration does on labelled rows: interval coverage and mean width (overall, by true age band,
    gender and group), the "at least min_age?" answer's rates, and the gender probability's ECE and log-loss
    before and after, with the reliability diagram's bins."""
    true_age, y = np.asarray(true_age, float), np.asarray(y_gender, int)
    covered, width = (true_age >= low) & (true_age <= high), high - low
    answer = min_age_answer(low, high, min_age)
    under, over = true_age < min_age, true_age >= min_age
    bands = age_bin(pd.Series(true_age), list(AGE_BANDS))
    out = {
        "rows": len(true_age),
        "coverage": float(covered.mean()),
        "width": float(width.mean()),
        "by_age": _coverage(bands.astype(str).to_numpy(), covered, width, list(bands.cat.categories)),
        "by_gender": _coverage(np.char.add("gender ", y.astype(str)), covered, width),
        "min_age": {
            "threshold": min_age,
            "yes_among_under": float((answer[under] == "yes").mean()) if under.any() else None,
            "no_among_over": float((answer[over] == "no").mean()) if over.any() else None,
            "unsure": float((answer == "unsure").mean()),
            "under": int(under.sum()),
            "over": int(over.sum()),
        },
        "gender": {
            "ece_before": ece(y, p_before),
            "ece_after": ece(y, p_after),
            "log_loss_before": log_loss(y, p_before),
            "log_loss_after": log_loss(y, p_after),
            "reliability_before": reliability(y, p_before),
            "reliability_after": reliability(y, p_after),
        },
    }
    if group is not None:
        out["by_group"] = _coverage(np.asarray(group).astype(str), covered, width)
    return out


def choose_gender(z: np.ndarray, y: np.ndarray, folds: np.ndarray, tried: tuple[str, ...]) -> dict[str, float]:
    """Each rescaling's out-of-fold log-loss on these rows (fitted on the other folds, scored on each)."""
    return {
        m: log_loss(y, out_of_fold(lambda zz, yy, m=m: fit_gender(m, zz, yy), lambda r, zz, yy: r(zz), folds, z, y))
        for m in tried
    }


def fit_calibration(
    age: np.ndarray,
    z: np.ndarray,
    y_age: np.ndarray,
    y_gender: np.ndarray,
    folds: np.ndarray,
    level: float,
    gender: str,
) -> tuple[Calibration, dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """The calibration fitted on all OOF rows of the blend (age, log-odds z), the out-of-fold log-loss of each
    gender rescaling tried (gender: one of GENDER_METHODS, or auto: the lowest), and every row's cross-fitted
    interval (low, high) and calibrated probability. With auto, a fold's rows are scored with the rescaling chosen
    and fitted on the other folds only, so the choice flatters nothing."""
    bounds = out_of_fold(
        lambda a, t: fit_age_intervals(a, t, level), lambda m, a, t: np.stack(m.bounds(a), axis=1), folds, age, y_age
    )
    tried = GENDER_METHODS if gender == "auto" else (gender,)
    losses = choose_gender(z, y_gender, folds, tried)
    chosen = min(losses, key=losses.get)

    def fit_chosen(zz, yy, ff):
        inner = choose_gender(zz, yy, ff, tried) if len(tried) > 1 and len(np.unique(ff)) > 1 else {chosen: 0.0}
        return fit_gender(min(inner, key=inner.get), zz, yy)

    calibrated = out_of_fold(fit_chosen, lambda r, zz, yy, ff: r(zz), folds, z, y_gender, folds)
    fitted = Calibration(fit_age_intervals(age, y_age, level), fit_gender(chosen, z, y_gender))
    return fitted, losses, bounds[:, 0], bounds[:, 1], calibrated
