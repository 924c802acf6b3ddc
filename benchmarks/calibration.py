"""Calibrated intervals and probabilities (issue 33), measured on a finished UTKFace run's OOF blend and its held-out
split, by hand: age intervals at a level, one for all rows against Mondrian bins of predicted age, each fold's
rows scored with what the other folds fitted; coverage and width by true age band, gender and race; the rates of
an "at least 18?" answer; the gender rescalings' cross-fitted log-loss and ECE. The held-out split is scored with
what all OOF rows fitted (its labels come from UTKFace's file names).

    .venv/bin/python benchmarks/calibration.py runs/utkface_cpu [LEVEL]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.calibration import logit  # noqa: E402
from pipeline.core.choices import GENDER_METHODS  # noqa: E402
from pipeline.inference.calibrate import (  # noqa: E402
    AGE_BANDS,
    age_bin,
    ece,
    fit_age_intervals,
    fit_gender,
    log_loss,
    out_of_fold,
)

RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}


def table(key, true, low, high):
    df = pd.DataFrame({"key": key, "cover": (true >= low) & (true <= high), "width": high - low})
    return df.groupby("key").agg(rows=("cover", "size"), coverage=("cover", "mean"), width=("width", "mean"))


def threshold_rates(true, low, high, n=18):
    yes, no = low >= n, high < n
    unsure = ~yes & ~no
    under, over = true < n, true >= n
    return {"yes among under-18": yes[under].mean(), "no among 18+": no[over].mean(), "unsure": unsure.mean()}


def print_tables(true, low, high, gender, race) -> None:
    """Coverage and width by true age band, gender and race, then the rates of the "at least 18?" answer."""
    for key in (
        age_bin(pd.Series(true), list(AGE_BANDS)).astype(str).to_numpy(),
        np.where(gender == 0, "gender 0", "gender 1"),
        race,
    ):
        print(table(key, true, low, high).round(3).to_string())
    print({k: round(float(v), 4) for k, v in threshold_rates(true, low, high).items()})


def conformalised_quantiles(pred, true, folds, level):
    """CQR, the alternative to Mondrian bins: for each fold k, quantile models of the error (true - predicted) at
    a/2 and 1 - a/2 on the predicted age, fitted on the folds other than k and k + 1, conformalised on fold k + 1,
    applied to fold k."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    def quantile(x, r, q):
        model = HistGradientBoostingRegressor(
            loss="quantile", quantile=q, max_iter=200, learning_rate=0.05, max_leaf_nodes=8, min_samples_leaf=100
        )
        return model.fit(x[:, None], r).predict

    alpha, r = 1 - level, true - pred
    low, high, ks = np.empty(len(pred)), np.empty(len(pred)), np.unique(folds)
    for i, k in enumerate(ks):
        cal, test = folds == ks[(i + 1) % len(ks)], folds == k
        fit = ~cal & ~test
        lo, hi = quantile(pred[fit], r[fit], alpha / 2), quantile(pred[fit], r[fit], 1 - alpha / 2)
        scores = np.maximum(lo(pred[cal][:, None]) - r[cal], r[cal] - hi(pred[cal][:, None]))
        n = len(scores)
        q = np.sort(scores)[min(n, int(np.ceil((n + 1) * (1 - alpha)))) - 1]
        x = pred[test][:, None]
        low[test], high[test] = np.clip(pred[test] + lo(x) - q, 0, 120), np.clip(pred[test] + hi(x) + q, 0, 120)
    return low, high


def main(run: Path, level: float = 0.9):
    oof = pd.read_csv(run / "oof_blend.csv")
    folds, pred, true = oof.fold.values, oof.age_blend.values, oof.age_true.values
    p, y = oof.prob_blend.values, oof.gender_true.values
    for adaptive in (False, True):
        b = out_of_fold(
            lambda pr, tr, adaptive=adaptive: fit_age_intervals(pr, tr, level, adaptive),
            lambda m, pr, tr: np.stack(m.bounds(pr), axis=1),
            folds,
            pred,
            true,
        )
        low, high = b[:, 0], b[:, 1]
        print(
            f"\n== age intervals at {level}, {'Mondrian by predicted age' if adaptive else 'one for all rows'} "
            f"(cross-fitted OOF): coverage {((true >= low) & (true <= high)).mean():.3f}, "
            f"width {np.mean(high - low):.1f}"
        )
        print_tables(true, low, high, y, [RACES.get(int(g), g) for g in oof.group])
    low, high = conformalised_quantiles(pred, true, folds, level)
    print(
        f"\n== age intervals at {level}, conformalised quantiles (boosted quantiles of the error on the predicted "
        f"age; cross-fitted OOF): coverage {((true >= low) & (true <= high)).mean():.3f}, "
        f"width {np.mean(high - low):.1f}"
    )
    print_tables(true, low, high, y, [RACES.get(int(g), g) for g in oof.group])
    z = logit(p)
    print(f"\n== gender (cross-fitted OOF): ECE before {ece(y, p):.4f}, log-loss {log_loss(y, p):.4f}")
    for method in GENDER_METHODS:
        q = out_of_fold(lambda zz, yy, method=method: fit_gender(method, zz, yy), lambda m, zz, yy: m(zz), folds, z, y)
        print(f"{method:12s} log-loss {log_loss(y, q):.4f}  ECE {ece(y, q):.4f}  acc@0.5 {((q > 0.5) == y).mean():.4f}")

    test = [pd.read_csv(f) for f in sorted(run.glob("*/fold*/test.csv"))]
    ids = test[0].id
    age = np.mean([t.age.values for t in test], axis=0)
    prob = np.mean([t.gender_prob.values for t in test], axis=0)
    z_avg = np.mean([logit(t.gender_prob.values) for t in test], axis=0)
    parts = ids.str.split("_")
    t_age, t_gender = parts.str[0].astype(float).values, parts.str[1].astype(int).values
    t_race = parts.str[2].map(lambda r: RACES.get(int(r), r) if r.isdigit() else "?").values
    final = fit_age_intervals(pred, true, level, True)
    low, high = final.bounds(age)
    print(
        f"\n== held out ({len(ids)} images), Mondrian intervals fitted on all OOF rows: coverage "
        f"{((t_age >= low) & (t_age <= high)).mean():.3f}, width {np.mean(high - low):.1f}, "
        f"MAE {np.abs(age - t_age).mean():.2f}"
    )
    print_tables(t_age, low, high, t_gender, t_race)
    print(
        f"gender, the folds' probability average: log-loss {log_loss(t_gender, prob):.4f}, "
        f"ECE {ece(t_gender, prob):.4f}"
    )
    for method in GENDER_METHODS:
        m = fit_gender(method, z, y)
        on_prob, on_z = m(logit(prob)), m(z_avg)
        print(
            f"{method:12s} on the probability average: log-loss {log_loss(t_gender, on_prob):.4f} ECE "
            f"{ece(t_gender, on_prob):.4f} | on the log-odds average (shipped): log-loss "
            f"{log_loss(t_gender, on_z):.4f} ECE {ece(t_gender, on_z):.4f}"
        )
    if (run / "bundle-onnx").is_dir():
        speed(run / "bundle-onnx")


def speed(folder: Path, faces: int = 256, repeats: int = 5) -> None:
    """bundle.predict on `faces` random crops with the calibration and without it, interleaved."""
    import time

    from pipeline.serving.bundle import load_bundle

    bundle = load_bundle(folder)
    crops = list(np.random.default_rng(0).integers(0, 256, (faces, 200, 200, 3), dtype=np.uint8))
    calibration, times = bundle.info.calibration, {"with": [], "without": []}
    bundle.predict(crops[:8])
    for _ in range(repeats):
        for name, c in (("with", calibration), ("without", None)):
            bundle.info.calibration = c
            t0 = time.perf_counter()
            bundle.predict(crops)
            times[name].append(time.perf_counter() - t0)
    w, wo = np.median(times["with"]), np.median(times["without"])
    print(
        f"\n== bundle.predict, {faces} crops, median of {repeats}: {w:.3f}s with calibration, {wo:.3f}s without "
        f"(ratio {w / wo:.3f})"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.9)
