import numpy as np
import pandas as pd
import pytest
from conftest import cli, write_config

from pipeline.core.config import ConfigError, ModelConfig, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.layout import PSEUDO_LABELS as PSEUDO_FILE
from pipeline.orchestration.launch import pseudo_label_waves
from pipeline.training.pseudo import TrainingRows, with_pseudo_labels

ONE_EPOCH = [{"epochs": 1, "train": "all", "lr": 0.003}]
TEACHER = {"name": "scratch_cnn", "pretrained": False, "phases": ONE_EPOCH}
STUDENT = {"name": "student", "arch": "scratch_cnn", "pretrained": False, "phases": ONE_EPOCH}


def test_a_student_trains_on_the_test_images_labelled_by_its_teachers_same_fold(demo_root, workdir):
    models = [TEACHER, {**STUDENT, "pseudo_labels": "scratch_cnn"}]
    cfg = write_config(workdir / "pl.yaml", experiment="pl", data={"root": demo_root}, models=models)
    r = cli("run", cfg, cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    exp = workdir / "runs" / "pl"
    folds = pd.read_csv(next((workdir / "folds").glob("*.csv")), dtype={"id": str})
    for k in (0, 1):
        teacher, student = exp / "scratch_cnn" / f"fold{k}", exp / "student" / f"fold{k}"
        # the fold's own teacher (never trained on fold k's validation rows), not the blend or another fold
        assert (student / PSEUDO_FILE).read_bytes() == (teacher / "test.csv").read_bytes()
        assert f"student fold {k}: + 24 test images pseudo-labelled by scratch_cnn fold {k}" in r.stdout
        oof = pd.read_csv(student / "oof.csv", dtype={"id": str})
        assert sorted(oof.id) == sorted(folds.id[folds.fold == k])  # its OOF rows are still fold k's
    assert (exp / "student" / "fold0" / PSEUDO_FILE).read_bytes() != (
        exp / "scratch_cnn" / "fold1" / "test.csv"
    ).read_bytes()


def test_a_student_without_its_teachers_predictions_stops_with_a_message(demo_root, workdir):
    models = [TEACHER, {**STUDENT, "pseudo_labels": "scratch_cnn"}]
    cfg = write_config(workdir / "pl.yaml", experiment="pl_train", data={"root": demo_root}, models=models)
    r = cli("train", cfg, cwd=workdir)  # the train stage alone: the teacher has no test predictions yet
    assert r.returncode == 2 and "run the train and predict stages for scratch_cnn first" in r.stderr, r.stderr
    assert not (workdir / "runs" / "pl_train" / "student" / "fold0" / "train_done.json").exists()


def test_pseudo_labelled_rows_are_the_test_images_with_soft_gender_targets(tmp_path):
    (tmp_path / PSEUDO_FILE).write_text("id,age,gender_prob\nt0,31.5,0.8\nt1,60.0,0.1\n")
    train, test = np.zeros((3, 4, 4, 3), np.uint8), np.full((2, 4, 4, 3), 7, np.uint8)
    rows, age, gender = np.array([0, 2]), np.array([20.0, 21.0, 22.0], np.float32), np.array([1.0, 0.0, 1.0])
    images, rows, age, gender = with_pseudo_labels(
        tmp_path, np.array(["t0", "t1"]), test, TrainingRows(train, rows, age, gender)
    )
    assert images.shape[0] == 5 and (images[3:] == 7).all() and rows.tolist() == [0, 2, 3, 4]
    assert age[rows].tolist() == [20.0, 22.0, 31.5, 60.0]
    np.testing.assert_allclose(gender[rows], [1.0, 1.0, 0.8, 0.1])
    with pytest.raises(PipelineError, match="not the test images' ids"):
        with_pseudo_labels(
            tmp_path, np.array(["t1", "t0"]), test, TrainingRows(train, np.array([0]), age[:3], gender[:3])
        )


def test_pseudo_labels_must_name_an_earlier_model_and_ray_runs_students_after_teachers(tmp_path):
    with pytest.raises(ConfigError, match="name a model listed before"):
        load_config(None, ["models=[{name: scratch_cnn, pseudo_labels: later}, {name: later}]"])
    with pytest.raises(ConfigError, match="name a model listed before"):
        load_config(None, ["models=[{name: scratch_cnn, pseudo_labels: scratch_cnn}]"])
    cfg = load_config(
        None,
        [
            "models=[{name: a, arch: scratch_cnn}, {name: b, arch: scratch_cnn, pseudo_labels: a}, "
            "{name: c, arch: scratch_cnn}, {name: d, arch: scratch_cnn, pseudo_labels: b}]"
        ],
    )
    m = {x.name: x for x in cfg.models}
    jobs = [(m[n], k) for n in "abcd" for k in (0, 1)]
    waves = pseudo_label_waves(cfg, jobs)
    assert [[(x.name, k) for x, k in w] for w in waves] == [
        [("a", 0), ("a", 1), ("c", 0), ("c", 1)],
        [("b", 0), ("b", 1)],
        [("d", 0), ("d", 1)],
    ]
    assert isinstance(cfg.models[1], ModelConfig) and cfg.models[1].pseudo_labels == "a"
