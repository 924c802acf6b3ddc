"""The typed files between stages (core/layout.py): each round-trips through its dataclass to the same bytes, and a
file of another version or a damaged one is refused in one line naming the stage that writes it again."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.layout import (
    BLEND,
    PREDICT_DONE,
    TRAIN_DONE,
    BlendFile,
    BundleInfo,
    PredictDone,
    TrainDone,
    TrialDone,
)

TABLE = {"m": {"mae": 5.0, "accuracy": 0.9, "f1": 0.9, "score": 0.8, "threshold": 0.5}}
BLEND_JSON = {
    "oof_rows": 90,
    "metric": "score",
    "cv": 0.8,
    "cv_in_sample": 0.81,
    "cross_fitted": {"mae": 5.1, "score": 0.8},
    "cv_unseen_folds": None,
    "table": {**TABLE, "blend": TABLE["m"]},
    "table_at_0.5": TABLE,
    "threshold": 0.48,
    "age_weights": {"m": 1.0},
    "gender_weights": {"m": 1.0},
    "selection": {"kept": 0.8, "last": 0.79, "gap": 0.01},
    "submission": "submissions/x-20261206-000000.csv",
}


def one_line_error(fn, *args) -> str:
    with pytest.raises(PipelineError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_blend_json_reads_and_writes_back_the_same_bytes(tmp_path):
    text = json.dumps(BLEND_JSON, indent=2)
    (tmp_path / BLEND).write_text(text)
    blend = BlendFile.read(tmp_path)
    assert blend.table_at_half == TABLE and blend.holdout is None and blend.blend_scores["score"] == 0.8
    out = tmp_path / "again"
    out.mkdir()
    blend.write(out)
    assert (out / BLEND).read_text() == text
    blend.holdout = {"score": 0.79}
    blend.write(out)
    assert list(json.loads((out / BLEND).read_text()))[-2:] == ["submission", "holdout"]


def test_blend_json_of_an_earlier_version_is_read_and_a_foreign_one_refused(tmp_path):
    old = {k: v for k, v in BLEND_JSON.items() if k not in ("cross_fitted", "cv_in_sample", "selection")}
    (tmp_path / BLEND).write_text(json.dumps(old))
    assert BlendFile.read(tmp_path).blend_scores == old["table"]["blend"]  # in-sample, as it then was
    (tmp_path / BLEND).write_text(json.dumps({"metric": "score"}))
    assert "run the blend stage again" in one_line_error(BlendFile.read, tmp_path)
    (tmp_path / BLEND).write_text("{not json")
    assert "not valid JSON" in one_line_error(BlendFile.read, tmp_path)
    assert "run the blend stage first" in one_line_error(BlendFile.read, tmp_path / "nowhere")


def test_done_markers_round_trip_and_refuse_another_version(tmp_path):
    TrainDone(3, "score", 0.8125).write(tmp_path)
    assert (tmp_path / TRAIN_DONE).read_text() == '{"best_epoch": 3, "score": 0.8125}'
    assert TrainDone.read(tmp_path) == TrainDone(3, "score", 0.8125)
    PredictDone(["none", "hflip"], 10, 4, {"score": 0.8}).write(tmp_path)
    assert PredictDone.read(tmp_path).oof == {"score": 0.8}
    TrialDone({"train.lr": 0.01}, "mae", 5.5).write(tmp_path)
    assert TrialDone.read(tmp_path, "mae").params == {"train.lr": 0.01}

    (tmp_path / TRAIN_DONE).write_text('{"epoch": 3}')
    assert "run the train stage again" in one_line_error(TrainDone.read, tmp_path)
    (tmp_path / PREDICT_DONE).write_text('{"tta": ["none"]}')
    assert "oof_rows" in one_line_error(PredictDone.read, tmp_path)
    assert "cv_score" in one_line_error(TrialDone.read, tmp_path, "score")


BUNDLE_JSON = {
    "format": "age-gender-bundle",
    "version": 1,
    "runtime": "onnx",
    "experiment": "exp",
    "created": "2026-12-06T00:00:00Z",
    "git_commit": "abc",
    "versions": {"python": "3.12.1"},
    "face_crop": "detect",
    "fit": "stretch",
    "zoom": 1.25,
    "tta": ["none", "hflip"],
    "max_age": 116.0,
    "input": "RGB uint8 face crops",
    "gender": {"threshold": 0.5, "labels": {"0": "male", "1": "female"}, "labels_from": "given", "labels_known": True},
    "models": [
        {
            **{"name": "m", "arch": "scratch_cnn", "img_size": 32, "drop_rate": 0.1, "age_head": "dldl"},
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "age_weight": 1.0,
            "gender_weight": 1.0,
            "folds": [{"fold": 0, "age_mean": 33.0, "age_std": 20.0, "epoch": 2, "file": "models/m/fold0.onnx"}],
        }
    ],
    "oof": {"metric": "score", "cv": 0.8},
    "holdout": None,
    "data": {"dataset": "demo"},
}


def test_bundle_json_reads_into_its_dataclass_and_back_and_refuses_other_versions(tmp_path):
    info = BundleInfo.from_json(json.dumps(BUNDLE_JSON).encode(), tmp_path)
    assert info.models[0].name == "m" and info.models[0].img_size == 32 and info.models[0].folds[0].epoch == 2
    assert info.models[0].spec["age_head"] == "dldl" and info.gender.labels_known
    assert info.to_json() == BUNDLE_JSON
    older = {k: v for k, v in BUNDLE_JSON.items() if k not in ("zoom", "face_crop", "experiment")}
    older["gender"] = {"threshold": 0.5, "labels": {"0": "0", "1": "1"}}
    old = BundleInfo.from_json(json.dumps(older).encode(), tmp_path)
    assert (old.zoom, old.face_crop, old.gender.labels_known) == (1.0, "none", None)
    for change, message in (
        ({"version": 2}, "bundle version 2; this pipeline reads version 1"),
        ({"format": "other"}, "does not describe an age-gender bundle"),
        ({"fit": "squash"}, "unknown fit 'squash'"),
        ({"zoom": 9}, "no number from 1 to 4"),
        ({"gender": {"labels": {}}}, "has no valid 'threshold'"),
    ):
        raw = json.dumps({**BUNDLE_JSON, **change}).encode()
        assert message in one_line_error(BundleInfo.from_json, raw, tmp_path)
    assert "not valid JSON" in one_line_error(BundleInfo.from_json, b"{", tmp_path)
