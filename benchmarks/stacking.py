"""Weighted blend against level-2 (stacked) models on a finished run's OOF predictions (by hand).

Every method is fitted on four folds' OOF rows and scores the fifth (nested folds, the run's own), so none sees
the rows it is scored on: the weighted blend (the ensembler's simplex weights and threshold), ridge on the
members' ages (with an intercept: it can also undo a shrinkage toward the mean), a cubic of the blended age
(calibration), isotonic regression of it, gradient boosting on all members' ages and probabilities, and a
logistic regression on the members' gender logits.

    .venv/bin/python benchmarks/stacking.py runs/utkface_cpu_run5 [--folds folds/utkface-k5-s42.csv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression, Ridge

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.metrics import evaluate  # noqa: E402
from pipeline.inference.blend import age_weights, best_threshold, gender_weights  # noqa: E402


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run's folder (with oof_blend.csv)")
    ap.add_argument("--folds", type=Path, default=Path("folds/utkface-k5-s42.csv"))
    args = ap.parse_args()
    oof = pd.read_csv(args.run / "oof_blend.csv")
    fold = pd.read_csv(args.folds).set_index("id").loc[oof.id, "fold"].to_numpy()
    y, g = oof.age_true.to_numpy(), oof.gender_true.to_numpy().astype(int)
    ages = oof[[c for c in oof if c.startswith("age:")]].to_numpy()
    probs = oof[[c for c in oof if c.startswith("prob:")]].to_numpy()

    def nested(fit_predict) -> np.ndarray:
        out = np.zeros(len(y))
        for k in np.unique(fold):
            out[fold == k] = fit_predict(fold != k, fold == k)
        return out

    blend_age = nested(lambda tr, te: ages[te] @ age_weights(ages[tr], y[tr]))
    blend_prob = nested(lambda tr, te: probs[te] @ gender_weights(probs[tr], g[tr]))

    def blended(tr, te):
        return ages[tr] @ age_weights(ages[tr], y[tr]), ages[te] @ age_weights(ages[tr], y[tr])

    def cubic(tr, te):
        a_tr, a_te = blended(tr, te)
        return np.polyval(np.polyfit(a_tr, y[tr], 3), a_te)

    def isotonic(tr, te):
        a_tr, a_te = blended(tr, te)
        return IsotonicRegression(out_of_bounds="clip").fit(a_tr, y[tr]).predict(a_te)

    both = np.column_stack([ages, logit(probs)])
    age_methods = {
        "weighted blend (the ensembler)": blend_age,
        "ridge on the members' ages": nested(lambda tr, te: Ridge(1.0).fit(ages[tr], y[tr]).predict(ages[te])),
        "cubic calibration of the blend": nested(cubic),
        "isotonic calibration of the blend": nested(isotonic),
        "gradient boosting on ages + logits": nested(
            lambda tr, te: (
                HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, random_state=0)
                .fit(both[tr], y[tr])
                .predict(both[te])
            )
        ),
    }
    logistic = nested(
        lambda tr, te: LogisticRegression(C=1.0).fit(logit(probs[tr]), g[tr]).predict_proba(logit(probs[te]))[:, 1]
    )
    gender_methods = {"weighted blend (the ensembler)": blend_prob, "logistic on the members' logits": logistic}

    def threshold_nested(prob: np.ndarray) -> np.ndarray:  # the threshold is fitted on the other folds too
        return nested(lambda tr, te: (prob[te] >= best_threshold(prob[tr], g[tr])).astype(float))

    print(f"{args.run}: {len(y)} OOF rows, {ages.shape[1]} members, scored on held-out folds (nested)\n")
    print(f"{'age method':38s} {'MAE':>7s} {'RMSE':>7s}   | with the blend's gender: score")
    decided = threshold_nested(blend_prob)
    for name, a in age_methods.items():
        m = evaluate(y, a, g, decided, 0.5)
        print(f"{name:38s} {m['mae']:7.4f} {m['rmse']:7.4f}   | {m['score']:.4f}")
    print(f"\n{'gender method':38s} {'acc':>7s} {'F1':>7s}   | with the blend's age: score")
    for name, p in gender_methods.items():
        m = evaluate(y, blend_age, g, threshold_nested(p), 0.5)
        print(f"{name:38s} {m['accuracy']:7.4f} {m['f1']:7.4f}   | {m['score']:.4f}")


if __name__ == "__main__":
    main()
