import os
import time

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import DataError
from pipeline.data import imaging as imaging_module
from pipeline.data.cache import cached_images, decode_image, prepare_images
from pipeline.data.competition import load_competition, parse_utkface_name
from pipeline.data.imaging import files_key


@pytest.mark.parametrize(
    "name, expected",
    [
        ("26_1_0_20170116171048641.jpg.chip.jpg", (26, 1, 0)),
        ("1_0_2_20161219140530307.jpg.chip.jpg", (1, 0, 2)),
        ("116_1_0_20170120134921760.jpg", (116, 1, 0)),
        ("39_1_20170116174525125.jpg.chip.jpg", None),  # race missing: one of UTKFace's malformed names
        ("61_3_20170109150557335.jpg.chip.jpg", None),
        ("26_2_0_20170116171048641.jpg.chip.jpg", None),  # gender must be 0/1
        ("face.jpg", None),
    ],
)
def test_parse_utkface_name(name, expected):
    assert parse_utkface_name(name) == expected


def _write(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_utkface_layout_skips_and_counts_bad_names(tmp_path):
    img = np.full((20, 20, 3), 128, np.uint8)
    for i in range(12):
        _write(tmp_path / f"{20 + i}_{i % 2}_0_2017011617104{i:04d}.jpg.chip.jpg", img)
    _write(tmp_path / "39_1_20170116174525125.jpg.chip.jpg", img)
    cfg = load_config(None, [f"data.root={tmp_path}", "folds.n_splits=2"])
    comp = load_competition(cfg)
    assert len(comp.train) == 12 and len(comp.test) == 0
    assert comp.train.age.min() == 20 and set(comp.train.gender) == {0, 1}
    assert comp.report()["skipped"] == 1
    assert "does not parse" in comp.skipped[0][1]


@pytest.mark.parametrize(
    "image_col, value_fmt, subdir",
    [
        ("image", "{i}.png", "train"),
        ("file", "{i}", "train"),  # no extension: found by trying the usual ones
        ("full_path", "imgs/{i}.png", ""),
        ("id", "{i}", "train"),
    ],
)
def test_kaggle_layout_detects_columns_and_paths(tmp_path, image_col, value_fmt, subdir):
    folder = tmp_path / (subdir or "imgs")
    folder.mkdir()
    (tmp_path / "test").mkdir()
    rows = []
    for i in range(10):
        _write(folder / f"{i}.png", np.full((16, 16, 3), i * 20, np.uint8))
        rows.append({image_col: value_fmt.format(i=i), "Age": 10 + i, "Gender": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    for i in range(3):
        _write(tmp_path / "test" / f"t{i}.png", np.zeros((16, 16, 3), np.uint8))
    pd.DataFrame({"ImageId": ["t2", "t0", "t1"], "age": 0, "gender": 0}).to_csv(
        tmp_path / "sample_submission.csv", index=False
    )
    comp = load_competition(load_config(None, [f"data.root={tmp_path}", "folds.n_splits=2"]))
    assert len(comp.train) == 10 and comp.train.age.tolist() == [float(10 + i) for i in range(10)]
    assert (comp.sub_id_col, comp.sub_age_col, comp.sub_gender_col) == ("ImageId", "age", "gender")  # the sample's
    assert comp.test.id.tolist() == ["t2", "t0", "t1"] and all(comp.test.path != "")


def test_bad_labels_are_skipped_or_stop(tmp_path):
    (tmp_path / "train").mkdir()
    ages = [20, 30, None, -3, 400, 40, 50, 60, 25, 35, 45, 55]
    genders = [0, 1, 0, 1, 0, 2, 1, 0, 1, 0, 1, 0]
    for i in range(len(ages)):
        _write(tmp_path / "train" / f"{i}.jpg", np.zeros((8, 8, 3), np.uint8))
    ids = [str(i) for i in range(len(ages))]
    ids[-1] = "0"  # duplicate id
    pd.DataFrame({"id": ids, "age": ages, "gender": genders}).to_csv(tmp_path / "train.csv", index=False)
    comp = load_competition(load_config(None, [f"data.root={tmp_path}", "folds.n_splits=2"]))
    reasons = [r for _, r in comp.skipped]
    assert len(comp.train) == 7
    assert any("not a number" in r for r in reasons) and any("outside" in r for r in reasons)
    assert any("not 0 or 1" in r for r in reasons) and any("duplicate" in r for r in reasons)
    with pytest.raises(DataError, match="data.on_error=skip"):
        load_competition(load_config(None, [f"data.root={tmp_path}", "data.on_error=fail"]))


def test_decode_handles_odd_images(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 0] = 200  # red
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=98)
    Image.fromarray(np.dstack([rgb, np.full((30, 40), 90, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    cv2.imwrite(str(tmp_path / "gray16.png"), np.full((30, 40), 200 * 257, np.uint16))
    for name in ("rgb.png", "cmyk.jpg", "rgba.png"):
        out = decode_image(str(tmp_path / name), 24)
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
        assert abs(int(out[..., 0].mean()) - 200) < 12 and out[..., 1:].mean() < 12, name
    for name in ("gray.png", "gray16.png"):
        out = decode_image(str(tmp_path / name), 24)
        assert out.shape == (24, 24, 3) and abs(int(out.mean()) - 200) < 3


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is not an image", "not a readable image"),
        (None, "cannot read file"),
    ],
)
def test_decode_errors_say_why(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=reason):
        decode_image(str(path), 16)


def test_cache_is_reused_and_rebuilt_when_a_source_changes(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        _write(p, np.full((10, 10, 3), 50 * i, np.uint8))
        paths.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    paths.append(str(tmp_path / "bad.jpg"))
    arr, ok, errors = cached_images(paths, 8, str(tmp_path / "cache"), "t")
    assert arr.shape == (4, 8, 8, 3) and ok.tolist() == [True, True, True, False] and errors[3]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    arr2, _, _ = cached_images(paths, 8, str(tmp_path / "cache"), "t")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1 and np.array_equal(arr, arr2)
    time.sleep(0.01)
    _write(tmp_path / "1.png", np.full((10, 10, 3), 255, np.uint8))
    arr3, _, _ = cached_images(paths, 8, str(tmp_path / "cache"), "t")
    assert arr3[1].min() == 255 and len(list((tmp_path / "cache").glob("*.npy"))) == 2
    cached_images(paths, 12, str(tmp_path / "cache"), "t")  # another resolution: another cache
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def test_cache_key_follows_the_contents_not_the_file_times(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging_module, "DIGEST_SPAN", 64)  # files longer than two spans: head and tail are read
    paths = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes(range(256)) * (i + 1))
    names = [str(p) for p in paths]
    key = files_key("h", names)
    for p in paths:  # a fresh copy of the same data: new file times
        os.utime(p, ns=(1, 1))
    assert files_key("h", names) == key
    body = bytearray(paths[2].read_bytes())
    body[-1] ^= 1  # a change in the last bytes of a file longer than the span
    paths[2].write_bytes(bytes(body))
    assert files_key("h", names) != key
    paths[2].unlink()
    assert files_key("h", names) != key  # a missing file is part of the key too


def test_unreadable_training_image_skipped_and_test_image_kept(demo_root, tmp_path):
    import shutil

    root = tmp_path / "comp"
    shutil.copytree(demo_root, root)
    (root / "train" / "train_00003.jpg").write_bytes(b"\xff\xd8\xff broken")
    (root / "test" / "test_00001.jpg").write_bytes(b"")
    cfg = load_config(None, [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "folds.n_splits=2"])
    given = load_competition(cfg)
    n_train, n_skipped = len(given.train), len(given.skipped)
    comp, images = prepare_images(given, cfg, 32)
    assert "train_00003" not in set(comp.train.id) and len(images.train) == len(comp.train) == 89
    assert len(images.test) == len(comp.test) == 24 and images.test[1].max() == 0
    assert any("train_00003" in f for f, _ in comp.skipped) and len(comp.skipped) == n_skipped + 1
    assert len(given.train) == n_train and len(given.skipped) == n_skipped  # what it was given is untouched
    again, _ = prepare_images(comp, cfg, 32)  # as for a second model: nothing more to skip
    assert again.train.equals(comp.train) and again.skipped == comp.skipped


def test_ids_that_look_like_numbers_keep_their_zeros(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for i in range(6):
        _write(tmp_path / "train" / f"00{i}.png", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "test" / "007.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "train.csv").write_text("id,age,gender\n" + "".join(f"00{i},{20 + i},{i % 2}\n" for i in range(6)))
    (tmp_path / "sample_submission.csv").write_text("id,age,gender\n007,0,0\n")
    comp = load_competition(load_config(None, [f"data.root={tmp_path}", "folds.n_splits=2"]))
    assert comp.train.id.tolist() == [f"00{i}" for i in range(6)] and comp.test.id.tolist() == ["007"]
    assert comp.train.age.tolist() == [20.0, 21.0, 22.0, 23.0, 24.0, 25.0] and comp.test.path.iat[0].endswith("007.png")


def _utkface_folder(root, ages_genders):
    root.mkdir()
    for i, (age, gender) in enumerate(ages_genders):
        (root / f"{age}_{gender}_0_2017011617{i:07d}.jpg.chip.jpg").write_bytes(b"")  # never decoded here
    return root


def test_holdout_is_stratified_disjoint_and_copes_with_a_one_image_stratum(tmp_path):
    people = [(20 + i % 40, i % 2) for i in range(40)] + [(99, 1)]  # the only woman over 75
    root = _utkface_folder(tmp_path / "utk", people)
    cfg = load_config(None, [f"data.root={root}", "data.holdout=0.25", "folds.n_splits=2"])
    comp = load_competition(cfg)
    train, held = set(comp.train.id), set(comp.test.id)
    assert len(held) == 11 and len(train) == 30 and not train & held and len(train | held) == 41
    assert comp.holdout_labels.id.tolist() == comp.test.id.tolist()
    assert set(comp.holdout_labels.columns) >= {"age", "gender"} and "age" not in comp.test.columns
    assert comp.holdout_labels.gender.sum() in (5, 6)  # stratified: genders split as evenly as they can be
    assert load_competition(cfg).test.id.tolist() == comp.test.id.tolist()  # seeded


def test_a_holdout_of_a_tiny_set_still_splits(tmp_path):
    root = _utkface_folder(tmp_path / "utk", [(5, 0), (30, 1), (31, 0), (50, 1), (90, 0), (91, 1), (60, 0), (3, 1)])
    comp = load_competition(load_config(None, [f"data.root={root}", "data.holdout=0.1", "folds.n_splits=2"]))
    assert len(comp.test) == 1 and len(comp.train) == 7


def test_labels_are_checked_without_touching_what_was_loaded(tmp_path, monkeypatch):
    import pipeline.data.competition as data

    loaded = {}
    real = data._load_kaggle

    def keep(*args):
        loaded["comp"] = real(*args)
        return loaded["comp"]

    monkeypatch.setattr(data, "_load_kaggle", keep)
    (tmp_path / "train").mkdir()
    for i in range(6):
        _write(tmp_path / "train" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "train.csv").write_text(
        "id,age,gender\n" + "".join(f"{i},{20 + i},{i % 2}\n" for i in range(5)) + "5,x,0\n"
    )
    comp = load_competition(load_config(None, [f"data.root={tmp_path}", "folds.n_splits=2"]))
    assert len(comp.train) == 5 and comp.skipped == [("5", "age 'x' is not a number")]
    assert len(loaded["comp"].train) == 6 and loaded["comp"].skipped == []


COLOURS = {"green": (0, 200, 0), "red": (200, 0, 0), "blue": (0, 0, 200), "white": (255, 255, 255), "black": (0, 0, 0)}


def _bands(*names, width):
    """A tall RGB image of horizontal bands, 20 rows each."""
    return np.concatenate([np.full((20, width, 3), COLOURS[n], np.uint8) for n in names])


def _colour(region):
    mean = region.reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda n: np.abs(mean - COLOURS[n]).sum())


def test_exif_orientation_is_applied(tmp_path):
    upright = _bands("green", "red", "blue", "white", width=40)  # 80 x 40, as the camera holder saw it
    stored = np.rot90(upright, 1)  # the sensor's 40 x 80 pixels; Orientation 6 = "rotate 90 degrees clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    assert Image.open(tmp_path / "phone.jpg").getexif()[0x0112] == 6
    out = decode_image(str(tmp_path / "phone.jpg"), 16)
    assert [_colour(out[r : r + 2, 4:12]) for r in (1, 5, 9, 13)] == ["green", "red", "blue", "white"]


@pytest.mark.parametrize(
    "fit, rows, side",
    [
        ("stretch", ["green", "red", "blue", "white"], "red"),  # squashed: every band, no border
        ("center_crop", ["red", "red", "blue", "blue"], "red"),  # the middle square: outer bands cut off
        ("pad", ["green", "red", "blue", "white"], "black"),  # whole, on a black square
    ],
)
def test_fit_makes_a_non_square_image_square(tmp_path, fit, rows, side):
    _write(tmp_path / "tall.png", _bands("green", "red", "blue", "white", width=40))
    out = decode_image(str(tmp_path / "tall.png"), 16, fit)
    assert out.shape == (16, 16, 3)
    assert [_colour(out[r : r + 2, 6:10]) for r in (1, 5, 9, 13)] == rows
    assert _colour(out[4:6, :3]) == side  # the left edge of rows 4-5: the image itself, or the pad's border


def test_cache_is_keyed_by_fit_and_prepare_images_uses_the_config(tmp_path):
    (tmp_path / "train").mkdir()
    for i in range(4):
        _write(tmp_path / "train" / f"{i}.png", _bands("green", "red", "blue", "white", width=40))
    (tmp_path / "train.csv").write_text("id,age,gender\n" + "".join(f"{i},{20 + i},{i % 2}\n" for i in range(4)))
    got = {}
    for fit in ("stretch", "pad", "center_crop"):
        cfg = load_config(None, [f"data.root={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", f"data.fit={fit}"])
        cfg.folds.n_splits = 2
        _, images = prepare_images(load_competition(cfg), cfg, 16)
        got[fit] = np.asarray(images.train)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    assert got["pad"][:, 4:6, :3].max() == 0 and got["stretch"][:, 4:6, :3].max() > 0
    assert not np.array_equal(got["stretch"], got["center_crop"])


def test_zoom_keeps_the_centred_part_of_each_image_in_its_own_cache(tmp_path):
    img = np.zeros((40, 40, 3), np.uint8)
    img[10:30, 10:30] = 200  # the centred half is bright, the border dark
    _write(tmp_path / "a.png", img)
    paths = [str(tmp_path / "a.png")]
    whole, _, _ = cached_images(paths, 20, str(tmp_path / "cache"), "t")
    zoomed, _, _ = cached_images(paths, 20, str(tmp_path / "cache"), "t", zoom=2.0)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # one cache per zoom
    assert zoomed.min() == 200 and whole.min() == 0
    assert np.array_equal(zoomed[0], cv2.resize(img[10:30, 10:30], (20, 20), interpolation=cv2.INTER_LINEAR))
    cfg = load_config(None, ["data.zoom=1.25"])
    assert cfg.data.zoom == 1.25
    with pytest.raises(ConfigError, match="data.zoom=0.8"):
        load_config(None, ["data.zoom=0.8"])
