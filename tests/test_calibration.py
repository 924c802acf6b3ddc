"""Calibration on synthetic data: the conformal quantile by hand, coverage within sampling error of the level on
held-out rows (overall and where the error grows with age), the gender rescaling's choice by log-loss."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inference.calibration import (
    conformal_bounds,
    cross_fitted,
    ece,
    fit_age_intervals,
    fit_gender,
    log_loss,
    mondrian_edges,
)


def test_the_conformal_quantile_by_hand():
    r = np.arange(1, 20, dtype=float)  # n = 19 residuals 1..19; level 0.8: a = 0.2
    # k_low = floor(20 * 0.1) = 2 -> 2.0; k_high = ceil(20 * 0.9) = 18 -> 18.0
    assert conformal_bounds(r, 0.8) == (2.0, 18.0)
    low, high = conformal_bounds(r[:5], 0.9)  # too few rows for a finite bound at 0.9: infinite, never too narrow
    assert low == -np.inf and high == np.inf


def _ages(n, rng):
    """True ages 1-90 and predictions whose error grows with age (sd 1 + age / 10) and is biased for elders."""
    true = rng.uniform(1, 90, n)
    pred = true + rng.normal(0, 1 + true / 10) - np.where(true > 50, 3.0, 0.0)
    return pred, true


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_coverage_on_held_out_rows_is_the_level(level):
    rng = np.random.default_rng(0)
    pred, true = _ages(20_000, rng)
    intervals = fit_age_intervals(pred, true, level)
    new_pred, new_true = _ages(20_000, rng)
    low, high = intervals.bounds(new_pred)
    covered = (new_true >= low) & (new_true <= high)
    se = np.sqrt(level * (1 - level) / len(covered))
    assert abs(covered.mean() - level) < 4 * se + 0.005
    young, old = new_pred < 20, new_pred > 60  # adaptive: narrow for the young, wide for elders, both covered
    assert (high - low)[young].mean() < 0.5 * (high - low)[old].mean()
    for part in (young, old):
        assert covered[part].mean() > level - 0.03


def test_bins_keep_enough_rows():
    pred = np.r_[np.full(50, 3.0), np.full(1000, 30.0), np.full(300, 80.0)]
    edges = mondrian_edges(pred, min_rows=200)
    assert edges[0] == 0 and 75 in edges and all(((pred >= e).sum()) >= 200 for e in edges)


def test_gender_rescaling_is_chosen_by_log_loss_and_fixes_overconfidence():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-z))).astype(float)
    p = 1 / (1 + np.exp(-3 * z))  # three times too confident
    folds = np.arange(len(y)) % 5
    before = log_loss(y, p)
    q = cross_fitted(lambda pp, yy: fit_gender("temperature", pp, yy), lambda m, pp, yy: m(pp), folds, p, y)
    assert log_loss(y, q) < before - 0.05 and ece(y, q) < ece(y, p) / 3
    assert fit_gender("temperature", p, y).a == pytest.approx(1 / 3, abs=0.03)
    assert ((q > 0.5) == (p > 0.5)).all()  # a monotone rescaling: the same decisions at 0.5
