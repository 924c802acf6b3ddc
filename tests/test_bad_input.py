"""Messy competition data: one clear line naming the file or row, never a traceback."""

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, cli
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.errors import DataError
from pipeline.data.cache import decode_image, prepare_images
from pipeline.data.competition import load_competition


def _comp(tmp_path, demo_root):
    root = tmp_path / "comp"
    shutil.copytree(demo_root, root)
    return root


def _cfg(root, tmp_path, *extra):
    return load_config(None, [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "folds.n_splits=2", *extra])


def test_odd_images_decode_and_bad_ones_say_why(tmp_path):
    good = {
        "tiny.png": np.full((8, 8, 3), 100, np.uint8),
        "huge.png": np.full((8000, 8000, 3), 100, np.uint8),
    }
    for name, img in good.items():
        cv2.imwrite(str(tmp_path / name), img)
        assert decode_image(str(tmp_path / name), 32).shape == (32, 32, 3)
    ok, buf = cv2.imencode(
        ".jpg", cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), (5, 5), 2)
    )
    (tmp_path / "truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("name,age\nx,3\n")
    for name in ("truncated.jpg", "corrupt.jpg", "text.jpg"):
        with pytest.raises(DataError, match="not a readable image"):
            decode_image(str(tmp_path / name), 32)
    with pytest.raises(DataError, match="empty file"):
        decode_image(str(tmp_path / "zero.jpg"), 32)


def test_unreadable_training_images_stop_when_asked(demo_root, tmp_path):
    root = _comp(tmp_path, demo_root)
    (root / "train" / "train_00007.jpg").write_bytes(b"")
    cfg = _cfg(root, tmp_path, "data.on_error=fail")
    with pytest.raises(DataError, match=r"train_00007.jpg: empty file"):
        prepare_images(load_competition(cfg), cfg, 32)


def test_rows_pointing_at_missing_files(demo_root, tmp_path):
    root = _comp(tmp_path, demo_root)
    (root / "train" / "train_00002.jpg").unlink()
    comp = load_competition(_cfg(root, tmp_path))
    assert len(comp.train) == 89 and "image file not found" in comp.skipped[0][1]
    assert "train_00002" in comp.skipped[0][0] and "row 4" in comp.skipped[0][0]
    with pytest.raises(DataError, match="row 4 .*image file not found"):
        load_competition(_cfg(root, tmp_path, "data.on_error=fail"))


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("id,age,gender\n", "header but no rows"),
        ("name,years,sex\nx,3,0\n", "cannot find the image column"),
        ("id,years,gender\ntrain_00000,3,0\n", "cannot find the age column"),
    ],
)
def test_unusable_train_csv(demo_root, tmp_path, content, message):
    root = _comp(tmp_path, demo_root)
    (root / "train.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_competition(_cfg(root, tmp_path))


def test_test_ids_without_images_and_duplicates_keep_one_row_each(demo_root, tmp_path, capsys):
    root = _comp(tmp_path, demo_root)
    sub = pd.read_csv(root / "sample_submission.csv")
    sub = pd.concat([sub, sub.iloc[:2], pd.DataFrame({"id": ["ghost"], "age": [0], "gender": [0]})])
    sub.to_csv(root / "sample_submission.csv", index=False)
    comp = load_competition(_cfg(root, tmp_path))
    out = capsys.readouterr().out
    assert "duplicate test ids" in out and "1 test ids have no image" in out
    assert comp.test.id.tolist() == list(dict.fromkeys(sub.id.astype(str))) and comp.test.id.iat[-1] == "ghost"
    assert comp.submission_ids == sub.id.astype(str).tolist()  # the submission keeps the sample's rows


def test_missing_folder_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        load_competition(load_config(None, [f"data.root={tmp_path / 'nope'}"]))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "face.jpg")
    with pytest.raises(DataError, match="cannot tell the layout"):
        load_competition(load_config(None, [f"data.root={tmp_path}"]))


def test_cli_prints_one_line_not_a_traceback(demo_root, tmp_path):
    root = _comp(tmp_path, demo_root)
    (root / "train.csv").write_text("id,age,gender\n")
    r = cli(
        "run",
        REPO / "configs/demo.yaml",
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "experiment=bad",
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {root / 'train.csv'}: has a header but no rows"]
