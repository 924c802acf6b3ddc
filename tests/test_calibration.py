"""Calibration on synthetic data: the conformal quantile by hand, coverage within sampling error of the level on
held-out rows (overall and where the error grows with age), the gender rescaling's choice by log-loss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.calibration import Calibration, min_age_answer
from pipeline.inference.calibrate import (
    conformal_bounds,
    ece,
    fit_age_intervals,
    fit_calibration,
    fit_gender,
    log_loss,
    mondrian_edges,
    out_of_fold,
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
    rows = np.bincount(np.searchsorted(edges, pred, side="right") - 1)
    assert edges == [0, 37] and (rows >= 200).all() and rows.sum() == len(pred)  # the 50 children join the 30s
    adults = np.random.default_rng(3).uniform(20, 70, 5_000)  # nothing predicted under 20: the first bin is 0-25
    edges = mondrian_edges(adults, min_rows=200)
    rows = np.bincount(np.searchsorted(edges, adults, side="right") - 1)
    assert edges[:2] == [0, 25] and (rows >= 200).all()
    intervals = fit_age_intervals(adults, adults + 1, 0.9)
    assert intervals.edges == edges and np.allclose(intervals.low, 1) and np.allclose(intervals.high, 1)
    assert mondrian_edges(np.full(50, 30.0)) == [0]  # too few rows for two bins: one


def test_gender_rescaling_is_chosen_by_log_loss_and_fixes_overconfidence():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-z))).astype(float)
    shown = 3 * z  # log-odds three times too confident
    p = 1 / (1 + np.exp(-shown))
    folds = np.arange(len(y)) % 5
    before = log_loss(y, p)
    q = out_of_fold(lambda zz, yy: fit_gender("temperature", zz, yy), lambda m, zz, yy: m(zz), folds, shown, y)
    assert log_loss(y, q) < before - 0.05 and ece(y, q) < ece(y, p) / 3
    assert fit_gender("temperature", shown, y).a == pytest.approx(1 / 3, abs=0.03)
    assert ((q > 0.5) == (p > 0.5)).all()  # a monotone rescaling: the same decisions at 0.5


def test_fit_calibration_chooses_the_lowest_out_of_fold_log_loss_and_round_trips_through_json():
    rng = np.random.default_rng(2)
    n = 5_000
    true = rng.uniform(1, 80, n)
    pred = true + rng.normal(0, 3, n)
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    folds = np.arange(n) % 5
    fitted, losses, low, high, calibrated = fit_calibration(pred, 3 * z, true, y, folds, 0.9, "auto")
    assert set(losses) == {"none", "temperature", "platt", "isotonic"}
    assert fitted.gender.method == min(losses, key=losses.get) != "none"
    assert abs(((true >= low) & (true <= high)).mean() - 0.9) < 0.02  # cross-fitted coverage
    # each fold's rows rescaled by the method chosen and fitted on the other folds: about the winner's loss
    assert log_loss(y, calibrated) < losses["none"] - 0.05
    assert log_loss(y, calibrated) == pytest.approx(min(losses.values()), abs=0.005)
    again = Calibration.from_json(json.loads(json.dumps(fitted.to_json())))
    assert again == fitted
    only = fit_calibration(pred, 3 * z, true, y, folds, 0.9, "none")[0]
    assert only.gender.method == "none"


def test_min_age_is_unsure_exactly_when_the_interval_straddles_it():
    low = np.array([18.0, 17.99, 10.0, 5.0, 18.0, 30.0])
    high = np.array([30.0, 25.0, 17.99, 18.0, 18.0, 40.0])
    assert min_age_answer(low, high, 18).tolist() == ["yes", "unsure", "no", "unsure", "yes", "yes"]
    straddles = (low < 18) & (high >= 18)
    assert ((min_age_answer(low, high, 18) == "unsure") == straddles).all()
