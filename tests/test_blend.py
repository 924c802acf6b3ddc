"""blend() on small synthetic prediction files: no training, a few seconds."""

import json

import numpy as np
import pandas as pd
import pytest

import pipeline.inference.blend as blend_module
from pipeline.core.config import Config, FoldsConfig, ModelConfig, TrackingConfig, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import evaluate
from pipeline.data.competition import Competition, load_competition
from pipeline.inference.blend import best_threshold, blend, load_model_predictions

N_TRAIN, N_TEST, K = 60, 12, 2


def _cfg(experiment="exp", models=("a", "b")) -> Config:
    return Config(
        experiment=experiment,
        folds=FoldsConfig(n_splits=K),
        models=[ModelConfig(name=m) for m in models],
        tracking=TrackingConfig(wandb=False),
    )


def _labels(seed=0, n=N_TRAIN, prefix="t") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"id": [f"{prefix}{i:03d}" for i in range(n)], "age": rng.uniform(1, 80, n), "gender": rng.integers(0, 2, n)}
    )


def _comp(train: pd.DataFrame, test_ids: list[str], **kw) -> Competition:
    test = pd.DataFrame({"id": test_ids, "path": ""})
    return Competition("c", train.assign(path=""), test, **kw)


def _model_guess(labels: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A model's noisy predictions of these labels: age and gender probability."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    prob = np.clip(0.25 + 0.5 * labels.gender.to_numpy() + rng.normal(0, 0.2, n), 0.01, 0.99)
    return pd.DataFrame({"id": labels.id, "age": labels.age + rng.normal(0, 5, n), "gender_prob": prob})


def _write_fold(exp_dir, model: str, k: int, oof: pd.DataFrame, test: pd.DataFrame) -> None:
    d = exp_dir / model / f"fold{k}"
    d.mkdir(parents=True, exist_ok=True)
    oof.to_csv(d / "oof.csv", index=False)
    test.to_csv(d / "test.csv", index=False)
    (d / "predict_done.json").write_text("{}")


def _write_predictions(exp_dir, train: pd.DataFrame, test_labels: pd.DataFrame, models=("a", "b")) -> None:
    for j, model in enumerate(models):
        for k in range(K):
            part = train.iloc[k::K]
            oof = _model_guess(part, 10 * j + k).assign(age_true=part.age, gender_true=part.gender)
            _write_fold(exp_dir, model, k, oof, _model_guess(test_labels, 100 + 10 * j + k))


@pytest.fixture
def experiment(workdir):
    train, test_labels = _labels(0), _labels(1, N_TEST, "x")
    exp_dir = workdir / "runs" / "exp"
    _write_predictions(exp_dir, train, test_labels)
    return exp_dir, train, test_labels


def test_blend_refuses_ids_a_model_lacks(experiment):
    exp_dir, train, test_labels = experiment
    path = exp_dir / "b" / "fold1" / "oof.csv"
    oof = pd.read_csv(path, dtype={"id": str})
    oof.iloc[1:].to_csv(path, index=False)
    with pytest.raises(PipelineError, match=rf"model b has no OOF prediction for 1 ids \(e.g. '{oof.id[0]}', fold 1\)"):
        blend(_cfg(), _comp(train, test_labels.id.tolist()), exp_dir)
    assert not (exp_dir / "blend.json").exists()


def test_blend_is_idempotent(experiment, capsys):
    exp_dir, train, test_labels = experiment
    comp = _comp(train, test_labels.id.tolist())
    first = blend(_cfg(), comp, exp_dir)
    capsys.readouterr()
    again = blend(_cfg(), comp, exp_dir)  # e.g. the run was killed after the submission was written
    assert again == first and f"submission already written: {first}" in capsys.readouterr().out
    assert sorted(p.name for p in (exp_dir.parent.parent / "submissions").iterdir()) == [first.name]
    other = blend(_cfg("other"), comp, exp_dir)  # another experiment's submission is its own
    assert other != first and other.read_bytes() == first.read_bytes()
    _write_predictions(exp_dir, train, test_labels.assign(age=test_labels.age + 3))  # new predictions: a new file
    changed = blend(_cfg(), comp, exp_dir)
    assert changed not in (first, other) and first.is_file()


def test_oof_is_clipped_like_the_submission_and_cv_is_what_it_earned(workdir, capsys):
    train, test_labels = _labels(0), _labels(1, N_TEST, "x")
    young = train.assign(age=np.where(train.index % 3 == 0, 0.5, train.age))
    exp_dir = workdir / "runs" / "exp"
    _write_predictions(exp_dir, young, test_labels)
    for k in range(K):  # model b predicts negative ages for the babies
        path = exp_dir / "b" / f"fold{k}" / "oof.csv"
        oof = pd.read_csv(path, dtype={"id": str})
        oof.assign(age=oof.age.where(oof.age_true > 1, -8.0)).to_csv(path, index=False)
    cfg = _cfg()
    blend(cfg, _comp(young, test_labels.id.tolist()), exp_dir)
    out = capsys.readouterr().out
    summary = json.loads((exp_dir / "blend.json").read_text())
    oof = pd.read_csv(exp_dir / "oof_blend.csv", dtype={"id": str})
    assert oof.age_blend.min() >= 0 and (oof["age:b"] < 0).any()
    y, g = oof.age_true.to_numpy(), oof.gender_true.to_numpy()
    t = best_threshold(oof.prob_blend.to_numpy(), g)
    earned = evaluate(y, np.clip(oof.age_blend, 0, cfg.data.max_age), g, oof.prob_blend, t)
    assert summary["threshold"] == t and summary["cv_in_sample"] == pytest.approx(earned["score"], abs=1e-12)
    assert f"scores {earned['score']:.4f} on them, in-sample" in out
    for name in ("a", "b"):  # every model on the blend's footing: clipped ages, its own tuned threshold, and 0.5
        prob = oof[f"prob:{name}"].to_numpy()
        age = np.clip(oof[f"age:{name}"], 0, cfg.data.max_age)
        tuned = summary["table"][name]
        assert tuned["threshold"] == best_threshold(prob, g)
        assert tuned["score"] == pytest.approx(evaluate(y, age, g, prob, tuned["threshold"])["score"])
        assert summary["table_at_0.5"][name]["f1"] == pytest.approx(evaluate(y, age, g, prob, 0.5)["f1"])


def test_blend_with_a_holdout_reads_its_labels_only_after_writing_the_submission(experiment, monkeypatch):
    exp_dir, train, test_labels = experiment
    comp = _comp(train, test_labels.id.tolist(), holdout_labels=test_labels)
    seen = []

    def spy(comp, sub):
        seen.append(sorted(p.name for p in (exp_dir.parent.parent / "submissions").glob("*.csv")))
        return real(comp, sub)

    real = blend_module.holdout_scores
    monkeypatch.setattr(blend_module, "holdout_scores", spy)
    path = blend(_cfg(), comp, exp_dir)
    assert seen == [[path.name]]  # called once, when the submission already existed
    sub = pd.read_csv(path, dtype={"id": str})
    held = json.loads((exp_dir / "blend.json").read_text())["holdout"]
    truth = test_labels.set_index("id").loc[sub.id]
    assert held == pytest.approx(evaluate(truth.age, sub.age, truth.gender, sub.gender, 0.5))
    # other held-out labels change the held-out score only, never the submission
    shuffled = test_labels.assign(age=test_labels.age[::-1].to_numpy(), gender=1 - test_labels.gender)
    again = blend(_cfg("shuffled"), _comp(train, test_labels.id.tolist(), holdout_labels=shuffled), exp_dir)
    assert again.read_bytes() == path.read_bytes()
    assert json.loads((exp_dir / "blend.json").read_text())["holdout"]["f1"] != held["f1"]


def test_test_predictions_are_averaged_by_id_whatever_each_fold_s_row_order(tmp_path):
    train, test_labels = _labels(0, 10), _labels(1, 5, "x")
    tests = [_model_guess(test_labels, 0), _model_guess(test_labels, 1).iloc[::-1]]
    for k in range(K):
        part = train.iloc[k::K]
        _write_fold(
            tmp_path, "m", k, _model_guess(part, k).assign(age_true=part.age, gender_true=part.gender), tests[k]
        )
    _, test = load_model_predictions(tmp_path, "m", K)
    expected = pd.concat(tests).groupby("id")[["age", "gender_prob"]].mean()
    assert sorted(test.id) == sorted(test_labels.id)
    got = test.set_index("id").loc[expected.index]
    assert np.allclose(got[["age", "gender_prob"]].to_numpy(), expected.to_numpy())
    log_odds = pd.concat(tests).assign(z=lambda t: np.log(t.gender_prob / (1 - t.gender_prob))).groupby("id").z.mean()
    assert np.allclose(got.gender_logit, log_odds.loc[expected.index])  # what the calibrated probability rescales
    assert np.allclose(
        test.set_index("id").age, ((tests[0].set_index("id").age + tests[1].set_index("id").age) / 2).loc[test.id]
    )


def _kaggle_folder(root, train: pd.DataFrame, test_ids: pd.Series):
    """train.csv, sample_submission.csv and empty image files (never decoded here)."""
    for sub in ("train", "test"):
        (root / sub).mkdir(parents=True)
    for i in train.id:
        (root / "train" / f"{i}.png").touch()
    for i in test_ids:
        (root / "test" / f"{i}.png").touch()
    train[["id", "age", "gender"]].to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test_ids, "age": 0, "gender": 0}).to_csv(root / "sample_submission.csv", index=False)
    return root


def test_gender_coding_of_the_training_labels_carries_to_the_submission(workdir):
    """A competition that codes gender the other way round gets the inverted submission: the pipeline predicts
    P(label == 1) in the training labels' own coding and never remaps it."""
    people, test_people = _labels(5, 40), _labels(6, 10, "x")  # `gender`: the truth, 0 = male as in UTKFace
    subs = {}
    for coding, flip in (("as_is", 0), ("inverted", 1)):
        labels = people.assign(age=people.age.round(), gender=people.gender ^ flip)
        root = _kaggle_folder(workdir / coding, labels, test_people.id)
        comp = load_competition(load_config(None, [f"data.root={root}", "folds.n_splits=2"]))
        # a perfect "model" learns from the loaded labels how often each true gender is labelled 1
        truth = people.set_index("id").gender
        learned = comp.train.groupby(truth.loc[comp.train.id].to_numpy()).gender.mean()
        exp_dir = workdir / "runs" / coding
        for k in range(K):
            part = comp.train.iloc[k::K]
            prob = 0.1 + 0.8 * learned.loc[truth.loc[part.id]].to_numpy()
            oof = pd.DataFrame({"id": part.id, "age": part.age, "gender_prob": prob})
            test_prob = 0.1 + 0.8 * learned.loc[test_people.gender].to_numpy()
            test = pd.DataFrame({"id": test_people.id, "age": test_people.age, "gender_prob": test_prob})
            for model in ("a", "b"):
                _write_fold(exp_dir, model, k, oof.assign(age_true=part.age, gender_true=part.gender), test)
        sub = pd.read_csv(blend(_cfg(coding), comp, exp_dir), dtype={"id": str})
        subs[coding] = sub.set_index("id").gender.loc[test_people.id].to_numpy()
    assert subs["as_is"].tolist() == test_people.gender.tolist()
    assert subs["inverted"].tolist() == (1 - test_people.gender).tolist()


def test_selection_optimism_compares_the_kept_epochs_with_the_last_ones(tmp_path):
    for k, (kept_epoch, scores) in enumerate([(2, [0.70, 0.80, 0.75]), (3, [0.60, 0.65, 0.90])]):
        fold = tmp_path / "m" / f"fold{k}"
        fold.mkdir(parents=True)
        pd.DataFrame({"epoch": [1, 2, 3], "val_score": scores}).to_csv(fold / "metrics.csv", index=False)
        done = {"best_epoch": kept_epoch, "score": scores[kept_epoch - 1]}  # as a trained fold writes it
        (fold / "train_done.json").write_text(json.dumps(done))
    got = blend_module.selection_optimism(tmp_path, ["m"], 2, "score")
    assert got == pytest.approx({"kept": 0.85, "last": 0.825, "gap": 0.025})
    (tmp_path / "m" / "fold1" / "metrics.csv").unlink()
    assert blend_module.selection_optimism(tmp_path, ["m"], 2, "score") is None


def test_the_headline_cv_is_the_blend_cross_fitted_over_the_folds(experiment, capsys):
    """Each fold's rows blended with weights and a threshold fitted on the other fold only, computed by hand here;
    the submission keeps the blend fitted on all rows."""
    exp_dir, train, test_labels = experiment
    blend(_cfg(), _comp(train, test_labels.id.tolist()), exp_dir)
    out = capsys.readouterr().out
    summary = json.loads((exp_dir / "blend.json").read_text())
    oof = pd.read_csv(exp_dir / "oof_blend.csv", dtype={"id": str})
    ages, probs = oof[["age:a", "age:b"]].to_numpy(), oof[["prob:a", "prob:b"]].to_numpy()
    y, g = oof.age_true.to_numpy(), oof.gender_true.to_numpy()
    age, decision = np.zeros(len(oof)), np.zeros(len(oof))
    for k in range(K):
        fit, held = oof.fold.to_numpy() != k, oof.fold.to_numpy() == k
        w_age = blend_module.age_weights(ages[fit], y[fit])
        w_gender = blend_module.gender_weights(probs[fit], g[fit])
        age[held] = ages[held] @ w_age
        decision[held] = probs[held] @ w_gender >= best_threshold(probs[fit] @ w_gender, g[fit])
    by_hand = evaluate(y, np.clip(age, 0, 120), g, decision)
    assert summary["cross_fitted"] == pytest.approx(by_hand, abs=1e-12)
    assert summary["cv"] == summary["cross_fitted"]["score"] != summary["cv_in_sample"]
    assert summary["cv_in_sample"] == summary["table"]["blend"]["score"]  # what the submission's blend scores
    assert f"CV score: {by_hand['score']:.4f} (cross-fitted" in out
    report = (exp_dir / "report.html").read_text()
    assert f"CV score (cross-fitted)<b>{by_hand['score']:.4f}" in report


def test_settings_chosen_on_some_folds_get_the_cv_of_the_other_folds_too(experiment, capsys):
    exp_dir, train, test_labels = experiment
    cfg = _cfg()
    cfg.folds.chosen_on = [0]
    blend(cfg, _comp(train, test_labels.id.tolist()), exp_dir)
    summary = json.loads((exp_dir / "blend.json").read_text())
    oof = pd.read_csv(exp_dir / "oof_blend.csv", dtype={"id": str})
    unseen = summary["cv_unseen_folds"]
    assert unseen["folds"] == [1] and unseen["score"] != summary["cv"]
    rows = oof.fold == 1  # fold 1 blended with what fold 0 fitted: scored on its own
    w_age = blend_module.age_weights(oof.loc[~rows, ["age:a", "age:b"]].to_numpy(), oof.age_true[~rows].to_numpy())
    age = np.clip(oof.loc[rows, ["age:a", "age:b"]].to_numpy() @ w_age, 0, 120)
    assert unseen["rmse"] == pytest.approx(float(np.sqrt(np.mean((age - oof.age_true[rows]) ** 2))), abs=1e-9)
    assert f"CV score on the other folds (1), which no choice saw: {unseen['score']:.4f}" in capsys.readouterr().out
