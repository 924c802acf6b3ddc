"""data.face_crop=detect: images are cropped to their face before the cache; images without one stay whole."""

from __future__ import annotations

import json
import os
import re

import cv2
import numpy as np
import pytest
from conftest import cli, cli_command, cli_env, ctrl_c, paste, write_config

from pipeline.core.config import load_config
from pipeline.data import faces as faces_module
from pipeline.data.cache import _cache_key, cached_images, find_faces, prepare_images
from pipeline.data.competition import load_competition
from pipeline.data.faces import best_face, crop_face
from pipeline.data.imaging import decode_rgb, read_bytes, square_resize
from pipeline.inference.report import _face_crop_html


def _scene(seed: int) -> np.ndarray:
    """A 480 x 640 background of smooth colour blobs: no face in it."""
    noise = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return cv2.resize(noise, (640, 480), interpolation=cv2.INTER_CUBIC)


def _write(path, rgb) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


@pytest.fixture(scope="module")
def face_files(tmp_path_factory, astronaut) -> list[str]:
    """Two scenes with the astronaut's head pasted small (~100 px wide) and two scenes without a face."""
    folder = tmp_path_factory.mktemp("faces")
    head = astronaut[20:280, 100:340]
    return [
        _write(folder / "face0.png", paste(_scene(0), head, 420, 200, 100)),
        _write(folder / "face1.png", paste(_scene(1), head, 60, 120, 120)),
        _write(folder / "plain0.png", _scene(2)),
        _write(folder / "plain1.png", _scene(3)),
    ]


def test_face_is_cropped_and_an_image_without_one_kept_whole(face_files, tmp_path):
    cache = str(tmp_path / "cache")
    cropped, ok, _ = cached_images(face_files, 48, cache, "t", "center_crop", "detect")
    whole, _, _ = cached_images(face_files, 48, cache, "t", "center_crop")
    assert ok.all()
    for i, path in enumerate(face_files):
        face, rgb = best_face(path), decode_rgb(read_bytes(path))
        assert (face is not None) == (i < 2)
        crop = rgb if face is None else crop_face(rgb, face)
        assert np.array_equal(cropped[i], square_resize(crop, 48, "center_crop"))
    assert np.abs(cropped[:2].astype(int) - whole[:2]).mean() > 20  # a face crop, not the scene
    assert np.array_equal(cropped[2:], whole[2:])


def test_detection_runs_once_for_every_image_size(face_files, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    cached_images(face_files, 32, cache, "t", face_crop="detect")
    monkeypatch.setattr(faces_module, "detect_faces", lambda *a, **k: pytest.fail("detected twice"))
    large, _, _ = cached_images(face_files, 64, cache, "t", face_crop="detect")
    assert len(list((tmp_path / "cache").glob("t-faces-*.json"))) == 1
    crop = crop_face(decode_rgb(read_bytes(face_files[0])), find_faces(face_files, cache, "t")[0])
    assert np.array_equal(large[0], square_resize(crop, 64, "stretch"))


def test_process_pool_finds_the_same_faces(face_files, tmp_path, monkeypatch):
    serial = find_faces(face_files, str(tmp_path / "a"), "t")
    monkeypatch.setattr(faces_module, "DETECT_POOL_FROM", 0)
    pooled = find_faces(face_files, str(tmp_path / "b"), "t")
    assert pooled == serial and [f is not None for f in serial] == [True, True, False, False]


def test_cache_key_has_face_crop_only_when_detecting(face_files):
    assert _cache_key(face_files, 48, "stretch") == _cache_key(face_files, 48, "stretch", "none")
    assert _cache_key(face_files, 48, "stretch", "detect") != _cache_key(face_files, 48, "stretch")


def test_images_without_a_face_are_counted_in_the_report(face_files, tmp_path):
    root = tmp_path / "comp"
    for split, names in (("train", [0, 1, 2, 3, 0, 2]), ("test", [1, 3])):
        (root / split).mkdir(parents=True)
        for j, i in enumerate(names):
            (root / split / f"{split}{j}.png").write_bytes(open(face_files[i], "rb").read())
    (root / "train" / "train6.png").write_bytes(b"not an image")  # unreadable: skipped, not "no face"
    (root / "train.csv").write_text("id,age,gender\n" + "".join(f"train{j},{20 + j},{j % 2}\n" for j in range(7)))
    (root / "test.csv").write_text("id\ntest0\ntest1\n")
    cfg = load_config(None, [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.face_crop=detect"])
    cfg.folds.n_splits = 2
    comp, images = prepare_images(load_competition(cfg), cfg, 32)
    assert len(images.train) == 6 and len(comp.skipped) == 1
    report = comp.report()["face_crop"]
    counts = {k: report[k] for k in ("train_images", "train_no_face", "test_images", "test_no_face")}
    assert counts == {"train_images": 6, "train_no_face": 3, "test_images": 2, "test_no_face": 1}
    files = [(os.path.basename(f["file"]), f["split"]) for f in report["no_face_files"]]
    assert files == [("train2.png", "train"), ("train3.png", "train"), ("train5.png", "train"), ("test1.png", "test")]
    line = comp.face_crop_line()
    assert line == "data: face_crop=detect: no face found in 3 of 6 training images and 1 of 2 test images (kept whole)"
    assert "no face found in 3 of 6 training images" in _face_crop_html(report)
    none_cfg = load_config(None, [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    none_cfg.folds.n_splits = 2
    plain, _ = prepare_images(load_competition(none_cfg), none_cfg, 32)
    assert plain.face_crop is None and "face_crop" not in plain.report()


def test_demo_run_with_face_crop_detect(demo_root, workdir):
    cfg = write_config(workdir / "crop.yaml", experiment="crop", data={"root": demo_root, "face_crop": "detect"})
    r = cli("run", cfg, cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((workdir / "runs" / "crop" / "data_report.json").read_text())["face_crop"]
    line = (
        f"data: face_crop=detect: no face found in {report['train_no_face']} of 90 training images and "
        f"{report['test_no_face']} of 24 test images (kept whole)"
    )
    assert line in r.stdout.splitlines()
    assert "Face crop (data.face_crop=detect)" in (workdir / "runs" / "crop" / "report.html").read_text()


def test_ctrl_c_during_face_detection_stops_every_process(face_files, tmp_path):
    """Ctrl-C (SIGINT to the whole process group) while worker processes look for faces in the training images:
    exit 130, one line, no traceback from any process, no process left, no detection cache written."""
    root = tmp_path / "comp"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    n = 800
    for i in range(n):
        (root / "train" / f"t{i}.png").symlink_to(face_files[i % 4])
    (root / "test" / "s0.png").symlink_to(face_files[0])
    (root / "train.csv").write_text("id,age,gender\n" + "".join(f"t{i},{20 + i % 50},{i % 2}\n" for i in range(n)))
    (root / "test.csv").write_text("id\ns0\n")
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "c.yaml", data={"root": root, "face_crop": "detect", "cache_dir": cache})
    progress = re.compile(rf"faces \S+: +\d+%.* [1-9]\d*/{n} \[")
    text = ctrl_c(cli_command("train", cfg), progress.search, cwd=tmp_path, env=cli_env())
    assert "interrupted" in text.rstrip().splitlines()[-1] and "Traceback" not in text, text[-2000:]
    assert not list(cache.glob("*faces*"))
