"""python -m pipeline tune: real Ray Tune trials (Ray started by the CLI itself on this machine, loopback only),
Optuna searcher, ASHA; the best.yaml it writes runs as it is. Plus the ray/tune config checks."""

from __future__ import annotations

import sys
import weakref

import pytest
import yaml
from conftest import cli, write_config
from test_ray import SocketWatch

from pipeline.core.config import ConfigError, load_config
from pipeline.orchestration.cli import UsageError, parse
from pipeline.orchestration.tune import quiet_sigterm_exit, tune_overrides

SPACE = [
    {"key": "models.0.phases.0.lr", "kind": "loguniform", "low": 0.001, "high": 0.01},
    {"key": "train.age_loss", "kind": "choice", "values": ["l1", "smoothl1"]},
    {"key": "train.gender_weight", "kind": "uniform", "low": 0.5, "high": 2.0},
]


def test_tune_writes_a_best_yaml_that_runs(demo_root, workdir):
    cfg = write_config(workdir / "c.yaml", data={"root": demo_root}, tune={"space": SPACE})
    with SocketWatch() as watch:
        r = cli("tune", cfg, "--trials", "2", "--folds", "0", cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not watch.bad and watch.seen > 0, watch.bad  # Ray started by the CLI stayed on loopback
    assert "cv_score" in r.stdout and "best config: runs/exp/tune/best.yaml" in r.stdout, r.stdout
    best = yaml.safe_load((workdir / "runs/exp/tune/best.yaml").read_text())
    assert best["experiment"] == "exp-tuned" and best["train"]["age_loss"] in ("l1", "smoothl1")
    assert 0.001 <= best["models"][0]["phases"][0]["lr"] <= 0.01
    assert best["folds"]["chosen_on"] == [0]  # the fold the trials were judged on
    trials = (workdir / "runs/exp/tune/trials.csv").read_text().splitlines()
    assert len(trials) == 3  # header + 2 trials
    r = cli("run", "runs/exp/tune/best.yaml", cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list((workdir / "submissions").glob("exp-tuned-*.csv"))
    assert "the settings were chosen on fold(s) 0 (folds.chosen_on): CV score on the other folds (1)" in r.stdout


def drop_object_whose_callback_raises(error: BaseException) -> None:
    """Where Ray's SIGTERM handler can land: inside a weakref callback, whose exception Python cannot raise."""

    class Trunk:
        pass

    def callback(_):
        raise error

    trunk = Trunk()
    ref = weakref.ref(trunk, callback)  # noqa: F841 (the callback needs the ref alive)
    del trunk  # the callback runs now


def test_a_stopped_trials_sigterm_exit_prints_nothing_other_errors_still_do(monkeypatch, capfd):
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's own, not pytest's
    drop_object_whose_callback_raises(SystemExit(1))
    assert "Traceback" in capfd.readouterr().err  # what the flaky CI run showed
    monkeypatch.setattr(sys, "unraisablehook", quiet_sigterm_exit)  # what run_trial installs in its worker
    drop_object_whose_callback_raises(SystemExit(1))
    assert capfd.readouterr().err == ""
    drop_object_whose_callback_raises(ValueError("a real bug"))
    assert "ValueError: a real bug" in capfd.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launcher=slurm"], "launcher='slurm' is not valid; choose one of: local, ray"),
        (["ray.cpus_per_job=0"], "ray.cpus_per_job=0: a job needs at least 1 CPU"),
        (["ray.gpus_per_job=-2"], "ray.gpus_per_job=-2.0: use -1 (auto), 0 or a positive number"),
        (["ray.shared_fs=maybe"], "ray.shared_fs: expected true/false"),
        (["tune.folds=[5]"], "tune.folds=[5]: name folds in 0..4"),
        (["tune.space.0.key=train.lr", "tune.space.0.kind=normal"], "kind='normal'; choose one of: loguniform"),
        (["tune.space.0.key=train.lr", "tune.space.0.kind=uniform"], "needs low < high"),
        (["tune.space.0.key=train.age_loss", "tune.space.0.kind=choice"], "kind=choice needs values"),
        (["tune.space.0.kind=uniform", "tune.space.0.low=0", "tune.space.0.high=1"], "name the dotted config key"),
    ],
)
def test_bad_ray_or_tune_config_is_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_tune_refuses_a_space_key_that_is_not_in_the_config(demo_root, workdir):
    space = [{"key": "train.lr", "kind": "uniform", "low": 0.1, "high": 0.2}]
    cfg = write_config(workdir / "c.yaml", data={"root": demo_root}, tune={"space": space})
    r = cli("tune", cfg, cwd=workdir)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown config key 'train.lr'"), r.stderr


def test_tune_command_line_shorthands():
    assert tune_overrides(3, [0, 2]) == ["tune.trials=3", "tune.folds=[0,2]"]
    assert tune_overrides() == [] and tune_overrides(folds=[1]) == ["tune.folds=[1]"]
    assert parse(["tune", "c.yaml", "--trials", "3", "--folds", "0,2", "train.ema=0.9"]).overrides == ["train.ema=0.9"]
    for item, instead in (("fold=1", "use --folds 1"), ("model=m", "use tune.model=m")):  # a trial trains tune.model
        with pytest.raises(UsageError, match=f"^{item} is not a config key: {instead}$"):
            parse(["tune", "c.yaml", item])
