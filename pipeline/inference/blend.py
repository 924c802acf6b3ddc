"""Blend the models from their OOF predictions only, then write a validated submission."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.metrics import f1_score

from ..core.calibration import Calibration, logit
from ..core.config import Config
from ..core.errors import PipelineError
from ..core.files import write_csv, write_text
from ..core.layout import (
    EPOCH_METRICS,
    OOF,
    OOF_BLEND,
    PREDICT_DONE,
    SUBMISSIONS,
    TEST,
    TRAIN_DONE,
    BlendFile,
    TrainDone,
    fold_dir,
    submission_path,
    submission_pattern,
)
from ..core.metrics import METRICS, evaluate, is_better
from ..core.tracking import Tracker
from ..data.competition import Competition
from ..data.test_set import shape_submission
from ..models.backbones import pretraining
from .calibrate import figures, fit_calibration, log_loss
from .report import write_report


def simplex_weights(preds: np.ndarray, loss) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise loss(preds @ w); preds is N x M."""
    m = preds.shape[1]
    if m == 1:
        return np.ones(1)
    res = minimize(
        lambda w: loss(preds @ w),
        np.full(m, 1 / m),
        method="SLSQP",
        bounds=[(0, 1)] * m,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1},),
        options={"ftol": 1e-12, "maxiter": 500},
    )
    w = np.clip(res.x, 0, None)
    return w / w.sum()


def age_weights(oof_ages: np.ndarray, y: np.ndarray) -> np.ndarray:
    return simplex_weights(oof_ages, lambda p: float(np.mean((p - y) ** 2)))


def gender_weights(oof_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    return simplex_weights(oof_probs, lambda p: log_loss(y, p))


def best_threshold(prob: np.ndarray, y: np.ndarray) -> float:
    """The decision threshold with the highest OOF macro-F1 (ties: closest to 0.5)."""
    grid = np.round(np.arange(0.2, 0.801, 0.01), 2)
    scores = np.array([f1_score(y, (prob >= t).astype(int), average="macro") for t in grid])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]])


def load_model_predictions(exp_dir: Path, model: str, n_splits: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A model's OOF rows over all folds (with their fold), and its test predictions averaged over folds by id."""
    oofs, tests = [], []
    for k in range(n_splits):
        d = fold_dir(exp_dir, model, k)
        if not (d / PREDICT_DONE).is_file():
            raise PipelineError(f"{d}: no predictions yet; run train and predict for --model {model} --fold {k}")
        oofs.append(pd.read_csv(d / OOF, dtype={"id": str}, keep_default_na=False).assign(fold=k))
        tests.append(pd.read_csv(d / TEST, dtype={"id": str}, keep_default_na=False))
        if set(tests[-1].id) != set(tests[0].id):
            raise PipelineError(
                f"{d / TEST} predicts other test ids than fold 0; delete {d} and run train and predict "
                f"for --model {model} --fold {k} again"
            )
    oof = pd.concat(oofs, ignore_index=True)
    test = pd.concat(tests)
    test["gender_logit"] = logit(test.gender_prob)  # the folds' log-odds average: the calibrated probability's base
    test = test.groupby("id", sort=False)[["age", "gender_prob", "gender_logit"]].mean().reset_index()
    return oof, test


def join_oof(oofs: dict[str, pd.DataFrame], exp_dir: Path) -> pd.DataFrame:
    """id, age_true, gender_true and every model's `age:NAME` and `prob:NAME`, one row per id. Refuses ids
    that some model predicted and another lacks (rather than dropping them, which would bias the CV)."""
    every = pd.concat([o[["id", "fold"]] for o in oofs.values()]).drop_duplicates("id")
    for name, o in oofs.items():
        problems = [
            ("has no OOF prediction for", every[~every.id.isin(o.id)]),
            ("has two OOF predictions for", o[o.id.duplicated()]),
            ("has non-finite OOF predictions for", o[~np.isfinite(o[["age", "gender_prob"]].to_numpy(float)).all(1)]),
        ]
        for what, rows in problems:
            if len(rows):
                k = rows.fold.iat[0]
                raise PipelineError(
                    f"model {name} {what} {len(rows)} ids (e.g. {rows.id.iat[0]!r}, "
                    f"fold {k}); delete {fold_dir(exp_dir, name, k)} and run train and predict for "
                    f"--model {name} --fold {k} again"
                )
    names = list(oofs)
    oof = oofs[names[0]][["id", "fold", "age_true", "gender_true"]]
    for name in names:
        cols = {"age": f"age:{name}", "gender_prob": f"prob:{name}"}
        oof = oof.join(oofs[name].set_index("id")[list(cols)].rename(columns=cols), on="id")
    return oof


def format_table(rows: dict[str, dict], cols: tuple[str, ...] = METRICS) -> str:
    width = max(len(k) for k in rows) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{c:>10}" for c in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{m[c]:>10.4f}" for c in cols))
    return "\n".join(lines)


def oof_tables(
    y_age: np.ndarray, y_gender: np.ndarray, preds: dict[str, tuple[np.ndarray, np.ndarray]], max_age: float
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every row (model or blend) scored as it would be submitted: ages clipped to [0, max_age], gender at the
    row's own OOF-tuned threshold (plus a `threshold` entry); and the same at threshold 0.5."""
    tuned, at_half = {}, {}
    for name, (age, prob) in preds.items():
        age = np.clip(age, 0, max_age)
        t = best_threshold(prob, y_gender)
        tuned[name] = {"threshold": t, **evaluate(y_age, age, y_gender, prob, t)}
        at_half[name] = evaluate(y_age, age, y_gender, prob, 0.5)
    return tuned, at_half


def newest_submission(folder: Path, experiment: str) -> Path | None:
    pattern = submission_pattern(experiment)
    found = [p for p in folder.glob("*.csv") if pattern.fullmatch(p.name)]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name)) if found else None


def write_submission(text: str, folder: Path, experiment: str) -> Path:
    """submissions/<experiment>-<timestamp>.csv, never overwriting one; if the experiment's newest submission
    already holds exactly `text` (a re-run, or a blend killed after writing it), that one is kept instead."""
    newest = newest_submission(folder, experiment)
    if newest is not None and newest.read_bytes() == text.encode():
        print(f"submission already written: {newest}")
        return newest
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = submission_path(folder, experiment, stamp), 1
    while path.exists():
        path = submission_path(folder, experiment, stamp, n)
        n += 1
    write_text(text, path)
    return path


def holdout_scores(comp: Competition, sub: pd.DataFrame) -> dict[str, float]:
    """The written submission scored on the held-out labels; call only after writing it."""
    h = comp.holdout_labels.set_index("id").loc[sub[comp.sub_id_col]]
    return evaluate(
        h.age.to_numpy(float),
        sub[comp.sub_age_col].to_numpy(float),
        h.gender.to_numpy(int),
        sub[comp.sub_gender_col].to_numpy(float),
        0.5,
    )


def selection_optimism(exp_dir: Path, names: list[str], n_splits: int, metric: str) -> dict | None:
    """Mean fold validation metric (no TTA) at the epochs the folds kept and at their last epochs. With
    train.select=best the kept epoch was chosen on the same rows the CV is scored on: the gap bounds how
    optimistic that choice makes the CV. None when a fold's metrics.csv or train_done.json is missing."""
    kept, last = [], []
    for name in names:
        for k in range(n_splits):
            fold = fold_dir(exp_dir, name, k)
            if not (fold / EPOCH_METRICS).is_file() or not (fold / TRAIN_DONE).is_file():
                return None
            history = pd.read_csv(fold / EPOCH_METRICS).set_index("epoch")[f"val_{metric}"]
            kept.append(history.loc[TrainDone.read(fold).best_epoch])
            last.append(history.iloc[-1])
    return {"kept": float(np.mean(kept)), "last": float(np.mean(last)), "gap": float(np.mean(kept) - np.mean(last))}


@dataclass
class OofBlend:
    """The blend as fitted on the OOF rows: the weights, the gender threshold and every row's scores."""

    names: list[str]
    oof: pd.DataFrame  # join_oof's table
    w_age: np.ndarray
    w_gender: np.ndarray
    age: np.ndarray  # the blend's OOF ages, clipped to [0, data.max_age]
    prob: np.ndarray
    table: dict[str, dict]  # oof_tables: each row at its own threshold
    table_half: dict[str, dict]  # and at 0.5
    cross_fitted: dict[str, float]  # the blend scored out of sample (cross_fitted): the headline CV
    calibration: Calibration  # fitted on every row of the cross-fitted blend
    chosen_by: dict[str, float]  # the gender rescalings tried: their cross-fitted log-loss
    crossed: pd.DataFrame  # every row out of sample: age, prob (the submission's blend), age_low, age_high, calibrated
    unseen: dict | None = None  # the same on the folds that did not choose the settings (folds.chosen_on)

    @property
    def threshold(self) -> float:
        return self.table["blend"]["threshold"]

    @property
    def in_sample(self) -> dict[str, float]:
        """The blend fitted on all OOF rows, scored on the same rows (what the submission's blend is)."""
        return {k: v for k, v in self.table["blend"].items() if k != "threshold"}


def fit_weights(ages: np.ndarray, probs: np.ndarray, y_age: np.ndarray, y_gender: np.ndarray):
    """Everything the blend fits: age weights (MSE), gender weights (log loss), then the gender threshold."""
    w_age, w_gender = age_weights(ages, y_age), gender_weights(probs, y_gender)
    return w_age, w_gender, best_threshold(probs @ w_gender, y_gender)


def cross_fitted(
    ages: np.ndarray, probs: np.ndarray, y_age: np.ndarray, y_gender: np.ndarray, fold: np.ndarray, max_age: float
) -> pd.DataFrame:
    """The blend out of sample: each fold's rows blended with the weights and threshold fitted on the other folds'
    rows only. Every row's age, gender decision (0/1; to be scored together as the in-sample rows are),
    probability and log-odds (the gender weights on the models' log-odds, which the calibration rescales)."""
    out = pd.DataFrame(index=range(len(y_age)), columns=["age", "decision", "prob", "z"], dtype=float)
    for k in np.unique(fold):
        held, fit = fold == k, fold != k
        w_age, w_gender, t = fit_weights(ages[fit], probs[fit], y_age[fit], y_gender[fit])
        prob = probs[held] @ w_gender
        out.loc[held] = np.column_stack(
            [np.clip(ages[held] @ w_age, 0, max_age), prob >= t, prob, logit(probs[held]) @ w_gender]
        )
    return out


def fit_blend(cfg: Config, names: list[str], oofs: dict[str, pd.DataFrame], exp_dir: Path) -> OofBlend:
    """Blend weights (age: MSE, gender: log loss) and the gender threshold, chosen on the OOF rows only."""
    oof = join_oof(oofs, exp_dir)
    y_age = oof.age_true.to_numpy(float)
    y_gender = oof.gender_true.to_numpy(int)
    ages = oof[[f"age:{n}" for n in names]].to_numpy(float)
    probs = oof[[f"prob:{n}" for n in names]].to_numpy(float)
    w_age, w_gender, _ = fit_weights(ages, probs, y_age, y_gender)
    blend_age, blend_prob = np.clip(ages @ w_age, 0, cfg.data.max_age), probs @ w_gender
    rows = {n: (ages[:, i], probs[:, i]) for i, n in enumerate(names)} | {"blend": (blend_age, blend_prob)}
    table, table_half = oof_tables(y_age, y_gender, rows, cfg.data.max_age)
    fold = oof.fold.to_numpy()
    x = cross_fitted(ages, probs, y_age, y_gender, fold, cfg.data.max_age)
    age_x, decision_x = x.age.to_numpy(), x.decision.to_numpy()
    scores = evaluate(y_age, age_x, y_gender, decision_x, 0.5)
    unseen = None
    if cfg.folds.chosen_on:
        other = ~np.isin(fold, cfg.folds.chosen_on)
        folds = sorted(set(fold[other].tolist()))
        unseen = {"folds": folds, **evaluate(y_age[other], age_x[other], y_gender[other], decision_x[other], 0.5)}
    c = cfg.calibration
    fitted, chosen_by, low, high, calibrated = fit_calibration(
        age_x, x.z.to_numpy(), y_age, y_gender, fold, c.age_level, c.gender
    )
    x = x.assign(age_low=low, age_high=high, calibrated=calibrated)
    return OofBlend(
        names=names, oof=oof, w_age=w_age, w_gender=w_gender, age=blend_age, prob=blend_prob, table=table,
        table_half=table_half, cross_fitted=scores, calibration=fitted, chosen_by=chosen_by, crossed=x, unseen=unseen,
    )  # fmt: skip


def print_oof(cfg: Config, b: OofBlend, selection: dict | None, calibration: dict) -> None:
    print(
        f"\nOOF results ({len(b.oof)} rows, {cfg.folds.n_splits} folds; ages clipped to [0, {cfg.data.max_age:g}]; "
        "blend weights and each row's gender threshold chosen on OOF):"
    )
    print(format_table(b.table, ("threshold", *METRICS)))
    print("the same at gender threshold 0.5:")
    print(format_table(b.table_half))
    print("age weights:    " + ", ".join(f"{n}={w:.3f}" for n, w in zip(b.names, b.w_age)))
    print(
        "gender weights: "
        + ", ".join(f"{n}={w:.3f}" for n, w in zip(b.names, b.w_gender))
        + f"; threshold {b.threshold:.2f}"
    )
    cv, fitted = b.cross_fitted[cfg.metric], b.in_sample[cfg.metric]
    print(
        f"CV {cfg.metric}: {cv:.4f} (cross-fitted: each fold blended with the weights and threshold fitted on the "
        f"other folds); the blend fitted on all rows, which the submission uses, scores {fitted:.4f} on them, "
        f"in-sample, {abs(fitted - cv):.4f} {'higher' if is_better(cfg.metric, fitted, cv) else 'lower'}"
    )
    if b.unseen is not None:
        print(
            f"the settings were chosen on fold(s) {', '.join(map(str, cfg.folds.chosen_on))} (folds.chosen_on): "
            f"CV {cfg.metric} on the other folds ({', '.join(map(str, b.unseen['folds']))}), which no choice saw: "
            f"{b.unseen[cfg.metric]:.4f}"
        )
    c, f = b.calibration, calibration["oof"]
    g = f["gender"]
    print(
        f"age intervals at {c.level:g}: coverage {f['coverage']:.3f}, mean width {f['width']:.1f} years "
        f"(cross-fitted, {len(c.age.edges)} bin{'s' * (len(c.age.edges) > 1)} of predicted age); gender probability "
        f"shown: the blend's log-odds, rescaling {c.gender.method} "
        f"(cross-fitted log-loss {g['log_loss_before']:.4f} -> {g['log_loss_after']:.4f}, "
        f"ECE {g['ece_before']:.4f} -> {g['ece_after']:.4f})"
    )
    if selection is not None:
        print(
            f"checkpoint epochs (train.select={cfg.train.select}): mean fold validation {cfg.metric} "
            f"{selection['kept']:.4f} at the kept epochs, {selection['last']:.4f} at the last ones"
            + (f" (the CV may be optimistic by up to {selection['gap']:.4f})" if cfg.train.select == "best" else "")
        )


def calibration_entry(cfg: Config, b: OofBlend, group: np.ndarray | None) -> dict:
    """blend.json's "calibration": what was fitted, how the gender rescaling was chosen, and its cross-fitted
    figures on the OOF rows (the held-out ones are added once the submission is written)."""
    oof, x = b.oof, b.crossed
    oof_figures = figures(
        oof.age_true.to_numpy(float), x.age_low.to_numpy(), x.age_high.to_numpy(), oof.gender_true.to_numpy(int),
        x.prob.to_numpy(), x.calibrated.to_numpy(), cfg.calibration.min_age, group,
    )  # fmt: skip
    return {**b.calibration.to_json(), "chosen_by": b.chosen_by, "oof": oof_figures}


def blend_summary(cfg: Config, b: OofBlend, selection: dict | None, group: np.ndarray | None) -> BlendFile:
    """blend.json (the submission's path and the held-out scores are added once they exist)."""
    return BlendFile(
        oof_rows=len(b.oof),
        metric=cfg.metric,
        cv=b.cross_fitted[cfg.metric],
        cv_in_sample=b.in_sample[cfg.metric],
        cross_fitted=b.cross_fitted,
        cv_unseen_folds=b.unseen,
        table=b.table,
        table_at_half=b.table_half,
        threshold=b.threshold,
        age_weights=dict(zip(b.names, b.w_age.tolist())),
        gender_weights=dict(zip(b.names, b.w_gender.tolist())),
        selection=selection,
        calibration=calibration_entry(cfg, b, group),
    )


def test_blend(cfg: Config, comp: Competition, b: OofBlend, tests: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The blended test predictions by test id: age (clipped), prob (the submission's) and z (log-odds)."""
    test_ids = comp.test.id
    for n in b.names:
        missing = set(test_ids) - set(tests[n].id)
        if missing:
            raise PipelineError(
                f"model {n} has no test prediction for {len(missing)} test ids (e.g. {sorted(missing)[0]!r}); "
                f"the test set changed since it predicted: delete its predict_done.json files and run predict again"
            )

    by_id = [tests[n].set_index("id").loc[test_ids] for n in b.names]

    def column(name: str, weights: np.ndarray) -> np.ndarray:
        return np.column_stack([t[name] for t in by_id]) @ weights

    age = np.clip(column("age", b.w_age), 0, cfg.data.max_age)
    z = column("gender_logit", b.w_gender)
    return pd.DataFrame({"age": age, "prob": column("gender_prob", b.w_gender), "z": z}, index=test_ids)


def submission_frame(cfg: Config, comp: Competition, b: OofBlend, test: pd.DataFrame) -> pd.DataFrame:
    """The blended test predictions in the sample submission's rows, order and columns, validated."""
    return shape_submission(comp.test_set(), test.age.to_numpy(), (test.prob.to_numpy() >= b.threshold).astype(int))


def holdout_calibration(cfg: Config, b: OofBlend, comp: Competition, test: pd.DataFrame) -> dict:
    """The calibration's figures on the held-out split (fitted on the OOF rows only; labels read after submitting)."""
    h = comp.holdout_labels.set_index("id").loc[test.index]
    low, high = b.calibration.age.bounds(test.age.to_numpy(), cfg.data.max_age)
    group = h.group.to_numpy() if "group" in h.columns else None
    return figures(
        h.age.to_numpy(float), low, high, h.gender.to_numpy(int), test.prob.to_numpy(),
        b.calibration.gender(test.z.to_numpy()), cfg.calibration.min_age, group,
    )  # fmt: skip


def blend(cfg: Config, comp: Competition, exp_dir: Path, submissions_dir: Path = SUBMISSIONS) -> Path | None:
    """Fit the blend on the OOF predictions, write oof_blend.csv, the submission (when there is a test set), then
    score it on the held-out labels (if any), and blend.json with the report."""
    names = [m.name for m in cfg.models]
    preds = {n: load_model_predictions(exp_dir, n, cfg.folds.n_splits) for n in names}
    b = fit_blend(cfg, names, {n: preds[n][0] for n in names}, exp_dir)
    selection = selection_optimism(exp_dir, names, cfg.folds.n_splits, cfg.metric)
    x = b.crossed
    oof = b.oof.assign(
        age_blend=b.age, prob_blend=b.prob, age_low=x.age_low.to_numpy(), age_high=x.age_high.to_numpy(),
        prob_calibrated=x.calibrated.to_numpy(),
    )  # fmt: skip
    if "group" in comp.train.columns:
        oof = oof.join(comp.train.set_index("id")["group"], on="id")
    summary = blend_summary(cfg, b, selection, oof.group.to_numpy() if "group" in oof.columns else None)
    print_oof(cfg, b, selection, summary.calibration)
    write_csv(oof, exp_dir / OOF_BLEND)

    if len(comp.test) == 0:
        print("no test set (no test.csv / sample_submission.csv, data.holdout=0): no submission written")
        _finish(cfg, exp_dir, summary, names)
        return None
    test = test_blend(cfg, comp, b, {n: preds[n][1] for n in names})
    sub = submission_frame(cfg, comp, b, test)
    submissions_dir.mkdir(parents=True, exist_ok=True)
    path = write_submission(sub.to_csv(index=False), submissions_dir, cfg.experiment)
    summary.submission = str(path)

    if comp.holdout_labels is not None:  # read only now, after every choice has been made
        held = holdout_scores(comp, sub)
        summary.holdout = held
        print(
            f"held-out test ({len(sub)} images, labels read only after writing the submission): "
            + ", ".join(f"{k} {v:.4f}" for k, v in held.items())
        )
        summary.calibration["holdout"] = hc = holdout_calibration(cfg, b, comp, test)
        print(
            f"held-out age intervals at {b.calibration.level:g}: coverage {hc['coverage']:.3f}, mean width "
            f"{hc['width']:.1f} years; gender ECE {hc['gender']['ece_before']:.4f} -> {hc['gender']['ece_after']:.4f}"
        )
    _finish(cfg, exp_dir, summary, names, path)
    print(f"submission: {path}")
    return path


def _finish(cfg: Config, exp_dir: Path, summary: BlendFile, names: list[str], submission: Path | None = None) -> None:
    """blend.json, the HTML report and the W&B blend run."""
    summary.write(exp_dir)
    weights = [pretraining(m) for m in cfg.models]
    report = write_report(exp_dir, names, cfg.folds.n_splits, cfg.metric, cfg.folds.age_bins, weights)
    print(f"report: {report}")
    tracker = Tracker(cfg, "blend", "blend", exp_dir)
    flat = {f"oof/{model}/{k}": v for model, m in summary.table.items() for k, v in m.items()}
    flat.update({f"oof_at_0.5/{model}/{k}": v for model, m in summary.table_at_half.items() for k, v in m.items()})
    flat.update({f"weights/age/{n}": w for n, w in summary.age_weights.items()})
    flat.update({f"weights/gender/{n}": w for n, w in summary.gender_weights.items()})
    flat.update({"threshold": summary.threshold, f"cv_{cfg.metric}": summary.cv})
    flat.update({f"cv_in_sample_{cfg.metric}": summary.cv_in_sample})
    flat.update({f"cross_fitted/{k}": v for k, v in summary.blend_scores.items()})
    flat.update({f"holdout/{k}": v for k, v in (summary.holdout or {}).items()})
    for where, f in ((w, (summary.calibration or {}).get(w)) for w in ("oof", "holdout")):
        if f:
            flat.update({f"calibration/{where}/{k}": f[k] for k in ("coverage", "width")})
            flat.update({f"calibration/{where}/gender_{k}": f["gender"][k] for k in ("ece_before", "ece_after")})
    tracker.log(flat)
    tracker.summary(flat)
    tracker.table("oof_table", summary.table)
    if submission is not None:
        tracker.artifact(f"{cfg.experiment}-submission", "submission", [submission, exp_dir / OOF_BLEND])
    tracker.finish()
