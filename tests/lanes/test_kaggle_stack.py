"""The installed package on Kaggle's Python and stack: the demo with faces detected (the demo_run fixture, run from
a folder holding a stray pipeline.py and pipeline/), export, predict-images, and the one-line errors of a
notebook that lacks an extra."""

from __future__ import annotations

import json

import cv2
import pandas as pd
from conftest import SLUG, agegender
from skimage import data


def test_the_demo_ran_with_faces_detected_into_a_valid_submission(demo_run, kaggle_root):
    blend = json.loads((demo_run / "runs" / "demo" / "blend.json").read_text())
    sub = pd.read_csv(demo_run / blend["submission"], dtype={"id": str})
    sample = pd.read_csv(kaggle_root / "input" / SLUG / "sample_submission.csv", dtype={"id": str})
    assert list(sub.columns) == list(sample.columns) and sub.id.tolist() == sample.id.tolist()
    assert sub.age.between(0, 120).all() and set(sub.gender) <= {0, 1}
    report = json.loads((demo_run / "runs" / "demo" / "data_report.json").read_text())
    assert "face_crop" in json.dumps(report)


def test_export_then_predict_images_on_a_photo(demo_run, tmp_path):
    r = agegender("export", "demo", "--format", "onnx", cwd=demo_run)
    assert r.returncode == 0, r.stdout + r.stderr
    archive = demo_run / "runs" / "demo" / "demo-bundle-onnx.tar.gz"
    photo = tmp_path / "astronaut.jpg"
    cv2.imwrite(str(photo), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "faces.csv"
    r = agegender("predict-images", archive, photo, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    faces = pd.read_csv(out)
    assert len(faces) == 1 and faces.face[0] == 0 and faces.score[0] > 0.75
    assert 150 < faces.x[0] < 200 and 40 < faces.y[0] < 90  # the astronaut's face, found by the shipped YuNet
    assert faces.gender_label[0] in ("female", "male") and 0 <= faces.age[0] <= 120


def test_a_missing_extra_is_one_line_naming_the_pip_command(demo_run, tmp_path):
    r = agegender("run", "demo", "launcher=ray", cwd=tmp_path)  # Kaggle's image has no Ray
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "launcher=ray needs the 'ray' extra" in r.stderr and "pip install 'agegender[ray]'" in r.stderr
    r = agegender("app", demo_run / "runs" / "demo" / "demo-bundle-onnx.tar.gz", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip install 'agegender[app]'" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_the_command_is_ours_beside_a_stray_pipeline_package(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("raise SystemExit('the stray pipeline/ was imported')\n")
    (tmp_path / "pipeline.py").write_text("raise SystemExit('the stray pipeline.py was imported')\n")
    r = agegender("--help", cwd=tmp_path)
    assert r.returncode == 0 and "agegender run" in r.stdout, r.stdout + r.stderr
