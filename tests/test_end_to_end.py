import pandas as pd
from conftest import cli, config_dict, write_config

MODELS = [
    {
        "name": "scratch_cnn",
        "pretrained": False,
        "phases": [{"epochs": 1, "train": "head", "lr": 0.003}, {"epochs": 2, "train": "all", "lr": 0.003}],
    },
    {
        "name": "tf_efficientnet_lite0",
        "phases": [{"epochs": 1, "train": "head", "lr": 0.003}, {"epochs": 1, "train": "last:2", "lr": 0.002}],
    },
]
SETTINGS = dict(models=MODELS, train={"batch_size": 16}, tta=["none", "hflip"])


def _read(path):
    return pd.read_csv(path, dtype={"id": str}, keep_default_na=False)


def test_end_to_end_run_resume_and_stages(demo_root, workdir):
    cfg = write_config(workdir / "tiny.yaml", experiment="tiny", data={"root": demo_root}, **SETTINGS)
    epochs = {m["name"]: sum(p["epochs"] for p in m["phases"]) for m in config_dict(**SETTINGS)["models"]}
    assert epochs == {"scratch_cnn": 3, "tf_efficientnet_lite0": 2}
    r = cli("run", cfg, cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CV score:" in r.stdout and "blend" in r.stdout
    subs = sorted((workdir / "submissions").glob("tiny-*.csv"))
    assert len(subs) == 1
    sub = _read(subs[0])
    sample = _read(demo_root / "sample_submission.csv")
    assert list(sub.columns) == list(sample.columns) and sub.id.tolist() == sample.id.tolist()
    assert sub.gender.isin([0, 1]).all() and sub.age.between(0, 120).all()

    train_ids = set(_read(demo_root / "train.csv").id)
    assert len(train_ids) == 90
    (folds_file,) = (workdir / "folds").glob("*.csv")
    folds = _read(folds_file)
    assert sorted(folds.id) == sorted(train_ids) and set(folds.fold) == {0, 1}
    for model, n_epochs in epochs.items():
        oof_ids = []
        for k in (0, 1):
            d = workdir / "runs" / "tiny" / model / f"fold{k}"
            assert (d / "best.pt").is_file() and (d / "oof.csv").is_file() and (d / "test.csv").is_file()
            assert _read(d / "metrics.csv").epoch.tolist() == list(range(1, n_epochs + 1))
            fold_oof = _read(d / "oof.csv").id.tolist()
            # fold k predicts exactly the ids the folds file puts in fold k, none it trained on
            assert sorted(fold_oof) == sorted(folds.id[folds.fold == k])
            assert not set(fold_oof) & set(folds.id[folds.fold != k])
            oof_ids += fold_oof
        assert len(oof_ids) == len(set(oof_ids)) and set(oof_ids) == train_ids  # every id once, out of fold
    oof = _read(workdir / "runs" / "tiny" / "oof_blend.csv")
    assert len(oof) == 90 and oof.id.is_unique and set(oof.id) == train_ids
    assert (workdir / "runs" / "tiny" / "config.yaml").is_file()

    # the same command again: nothing retrained, no second submission, the earlier one untouched
    before = subs[0].read_bytes()
    r2 = cli("run", cfg, cwd=workdir)
    assert r2.returncode == 0 and "already trained, skipping" in r2.stdout, r2.stdout + r2.stderr
    written = [line for line in r2.stdout.splitlines() if line.startswith("submission already written: ")]
    assert len(written) == 1 and written[0].endswith(subs[0].name), r2.stdout  # the path of the first one
    assert sorted((workdir / "submissions").glob("tiny-*.csv")) == subs and subs[0].read_bytes() == before

    # a changed config under the same experiment name is refused
    r3 = cli("run", cfg, "models.0.phases.0.epochs=4", cwd=workdir)
    assert r3.returncode == 2 and "different config" in r3.stderr

    # stage by stage, one model and fold at a time, under another name: the same submission
    staged = write_config(workdir / "staged.yaml", experiment="staged", data={"root": demo_root}, **SETTINGS)
    assert cli("folds", staged, cwd=workdir).returncode == 0
    early = cli("blend", staged, cwd=workdir)
    assert early.returncode == 2 and "no predictions yet" in early.stderr
    for k in ("0", "1"):
        assert cli("train", staged, "--model", "scratch_cnn", "--fold", k, cwd=workdir).returncode == 0
    assert cli("train", staged, "--model", "tf_efficientnet_lite0", cwd=workdir).returncode == 0
    assert cli("predict", staged, cwd=workdir).returncode == 0
    r4 = cli("blend", staged, cwd=workdir)
    assert r4.returncode == 0, r4.stderr
    (staged_sub,) = (workdir / "submissions").glob("staged-*.csv")
    assert staged_sub.read_bytes() == before
