"""predict-images: photo decoding, bad input, one row per face, the CLI. The bundle here is FakeBundle, a test
double of pipeline.serving.bundle.Bundle's predict interface, so these tests need no trained model."""

from __future__ import annotations

import io
import json
import signal
import struct
import sys
import types
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import cli_command, cli_env, ctrl_c
from PIL import Image
from skimage import data

from pipeline.core.errors import DataError, PipelineError
from pipeline.data import imaging
from pipeline.serving import photos

ASTRONAUT_FACE = (177, 63, 89, 112)  # x, y, w, h in skimage's astronaut


class FakeBundle:
    """Test double of pipeline.serving.bundle.Bundle: predict(list of RGB uint8 crops) -> age, gender_prob, gender,
    gender_label. The age is the crop's mean brightness, so that a test can tell crops apart."""

    face_crop = "none"
    labels_known = True
    calibration = None  # no intervals, as a bundle exported before calibration

    def __init__(self) -> None:
        self.batches: list[list[np.ndarray]] = []

    def predict(self, faces: list[np.ndarray]) -> pd.DataFrame:
        self.batches.append(faces)
        age = [float(f.mean()) / 4 for f in faces]
        prob = [float(f[..., 0].mean()) / 255 for f in faces]
        return pd.DataFrame(
            {
                "age": age,
                "gender_prob": prob,
                "gender": [int(p >= 0.5) for p in prob],
                "gender_label": ["female" if p >= 0.5 else "male" for p in prob],
            }
        )


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


def save(path: Path, rgb: np.ndarray, **kwargs) -> Path:
    Image.fromarray(rgb).save(path, **kwargs)
    return path


def group_photo(astronaut: np.ndarray, n: int) -> np.ndarray:
    tile = cv2.resize(astronaut[20:280, 100:340], (100, 108), interpolation=cv2.INTER_AREA)
    cols = min(n, 6)
    rows = [np.hstack([tile] * cols) for _ in range(n // cols)]
    return np.vstack(rows)


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG whose header says side x side pixels (8-bit gray), with a few rows of data: decoding it fully
    would need side^2 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\x00" * (side + 1) * 16)
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, astronaut) -> Path:
    """Good and bad photos, as a user's folder might hold them."""
    d = tmp_path_factory.mktemp("photos")
    save(d / "astronaut.jpg", astronaut, quality=95)
    save(d / "gray.png", cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY))
    save(d / "rgba.png", np.dstack([astronaut, np.full(astronaut.shape[:2], 200, np.uint8)]))
    cv2.imwrite(str(d / "sixteen_bit.png"), astronaut[:, :, ::-1].astype(np.uint16) * 257)
    Image.fromarray(astronaut).convert("CMYK").save(d / "cmyk.jpg")
    noise = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    frames = [Image.fromarray(astronaut), Image.fromarray(cv2.resize(noise, (512, 512)))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    # a phone photo: pixels stored on their side, EXIF orientation 6 says "turn 90 degrees clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    save(d / "phone.jpg", np.ascontiguousarray(np.rot90(astronaut[:, :400])), exif=exif, quality=95)
    save(d / "no_face.png", noise)
    (d / "group").mkdir()
    save(d / "group" / "thirty.png", group_photo(astronaut, 30))
    (d / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (d / "notes.jpg").write_text("not an image at all\n")
    bomb_png(d / "bomb.png")
    return d


GOOD = ["astronaut.jpg", "gray.png", "rgba.png", "sixteen_bit.png", "cmyk.jpg", "animated.gif", "phone.jpg"]


@pytest.mark.parametrize("name", GOOD)
def test_every_kind_of_photo_decodes_upright_and_shows_the_face(photo_dir, name):
    rgb = photos.read_photo(str(photo_dir / name))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[:2] == ((512, 400) if name == "phone.jpg" else (512, 512))  # EXIF orientation applied
    found = photos.faces.detect_faces(rgb)
    assert len(found) == 1
    x, y, w, h = found[0].box
    assert abs(x + w / 2 - 221) < 15 and abs(y + h / 2 - 119) < 15  # where the face is in the upright photo


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty.jpg", "empty file (0 bytes)"),
        ("truncated.jpg", "not a readable image"),
        ("notes.jpg", "not a readable image"),
        ("bomb.png", "image too large: 900 Mpx, the limit is 100 Mpx"),
        ("missing.jpg", "cannot read file (No such file or directory)"),
    ],
)
def test_bad_files_are_refused_with_the_reason(photo_dir, name, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        photos.read_photo(str(photo_dir / name))


def test_bomb_is_refused_before_decoding(photo_dir, monkeypatch):
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("the bomb reached the decoder"))
    with pytest.raises(DataError, match="decompression bomb"):
        photos.read_photo(str(photo_dir / "bomb.png"))


def test_paths_from_files_folders_and_globs(photo_dir):
    every = photos.photo_paths([str(photo_dir)])
    assert str(photo_dir / "group" / "thirty.png") in every  # folders are searched recursively
    assert len(every) == len(set(every)) == 13
    globbed = photos.photo_paths([str(photo_dir / "*.png"), str(photo_dir / "astronaut.jpg")])
    assert [Path(p).name for p in globbed] == ["bomb.png", "gray.png", "no_face.png", "rgba.png", "sixteen_bit.png"] + [
        "astronaut.jpg"
    ]
    assert photos.photo_paths(["nowhere/*.jpg", "missing.png"]) == ["nowhere/*.jpg", "missing.png"]


def test_predict_images_rows(photo_dir):
    bundle = FakeBundle()
    names = ["astronaut.jpg", "group/thirty.png", "no_face.png", "empty.jpg", "bomb.png"]
    df = photos.predict_images(bundle, [str(photo_dir / n) for n in names], batch_size=8)
    assert list(df.columns) == [*(c for c in photos.COLUMNS if c not in photos.INTERVAL), "gender_label", "note"]
    by_file = df.groupby(df.file.map(lambda p: Path(p).name), sort=False)
    assert by_file.size().to_dict() == {
        "astronaut.jpg": 1,
        "thirty.png": 30,
        "no_face.png": 1,
        "empty.jpg": 1,
        "bomb.png": 1,
    }
    group = df[df.file.str.endswith("thirty.png")]
    assert group.face.tolist() == list(range(30))
    assert group.age.notna().all() and (group.score >= 0.75).all()
    astro = df[df.file.str.endswith("astronaut.jpg")].iloc[0]
    assert astro.face == 0 and astro.note == "" and abs(astro.x - 177) < 10 and abs(astro.w - 89) < 10
    assert df.loc[df.file.str.endswith("no_face.png"), "note"].item() == "no face found"
    assert df.loc[df.file.str.endswith("empty.jpg"), "note"].item() == "empty file (0 bytes)"
    assert df.loc[df.file.str.endswith("bomb.png"), "note"].item().startswith("image too large")
    bad = df[df.face < 0]
    assert bad.age.isna().all() and bad.x.isna().all()
    # 31 crops in batches of at most 8, every crop a UTKFace-sized RGB chip
    assert [len(b) for b in bundle.batches] == [8, 8, 8, 7]
    assert all(c.shape == (200, 200, 3) and c.dtype == np.uint8 for b in bundle.batches for c in b)


def test_whole_image_when_no_face(photo_dir):
    df = photos.predict_images(FakeBundle(), [str(photo_dir / "no_face.png")], whole_image_if_no_face=True)
    row = df.iloc[0]
    assert row.face == -1 and row.note == "no face found: predicted on the whole image"
    assert np.isfinite(row.age) and (row.w, row.h) == (320, 240)


@pytest.fixture
def fake_bundle_module(monkeypatch):
    """pipeline.serving.bundle replaced by a module whose load_bundle returns a FakeBundle (or fails, for 'bad')."""
    from pipeline.core.errors import PipelineError

    def load_bundle(path, device="auto", torch_runners=None):
        if str(path).endswith("bad"):
            raise PipelineError(f"{path}: not a bundle")
        return FakeBundle()

    from pipeline.serving.bundle import NAME_THEM

    module = types.ModuleType("pipeline.serving.bundle")
    module.load_bundle, module.NAME_THEM = load_bundle, NAME_THEM
    monkeypatch.setitem(sys.modules, "pipeline.serving.bundle", module)


def test_cli_writes_the_table_and_one_line_per_problem(photo_dir, tmp_path, fake_bundle_module, capsys):
    out = tmp_path / "preds.csv"
    code = photos.predict_images_cli(["BUNDLE", str(photo_dir), "--out", str(out), "--batch-size", "4"])
    assert code == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 7 + 30 + 1 + 4  # good photos, the group, no face, 4 bad files
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name, why in [
        ("empty.jpg", "empty file"),
        ("truncated.jpg", "not a readable image"),
        ("notes.jpg", "not a readable image"),
        ("bomb.png", "image too large"),
        ("no_face.png", "no face found"),
    ]:
        assert f"{photo_dir / name}: {why}" in err
    assert "13 photos: 37 faces, 1 without a face, 4 unreadable" in err


def test_cli_prints_csv_without_out(photo_dir, fake_bundle_module, capsys):
    assert photos.predict_images_cli(["BUNDLE", str(photo_dir / "astronaut.jpg")]) == 0
    out = capsys.readouterr().out
    df = pd.read_csv(io.StringIO(out))
    assert len(df) == 1 and df.face.item() == 0


def test_cli_usage_errors_are_one_line(fake_bundle_module, capsys):
    assert photos.predict_images_cli([]) == 2
    assert photos.predict_images_cli(["bad", "x.jpg"]) == 2
    assert photos.predict_images_cli(["BUNDLE", "x.jpg", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: bad: not a bundle" in err and "Traceback" not in err


def test_large_image_under_pillows_own_limit_is_refused_by_its_size(tmp_path):
    with pytest.raises(DataError, match="image too large: 11000 x 11000 pixels, the limit is 100 Mpx"):
        photos.read_photo(str(bomb_png(tmp_path / "big.png", side=11000)))


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory) -> Path:
    """A real bundle archive written by pipeline.exporting.export: scratch_cnn at 32 px, 2 folds, untrained weights
    (what is under test here is reading and calling a bundle, not its accuracy)."""
    import torch
    from conftest import write_config

    from pipeline.core.calibration import AgeIntervals, Calibration, GenderRescaling
    from pipeline.core.config import ModelConfig, load_config
    from pipeline.core.layout import BlendFile
    from pipeline.exporting.export import FoldState, ModelFolds, bundle_info, write_bundle
    from pipeline.models.backbones import create_model

    root = tmp_path_factory.mktemp("bundle")
    cfg = load_config(str(write_config(root / "cfg.yaml", data={"gender_labels": ["male", "female"]})))
    torch.manual_seed(0)
    mcfg = ModelConfig(name="scratch_cnn", pretrained=False, img_size=32)
    folds = [FoldState(k, create_model(mcfg, load_weights=False).state_dict(), 30.0, 15.0) for k in range(2)]
    members = [ModelFolds(mcfg, folds)]
    calibration = Calibration(
        AgeIntervals(0.9, [0.0, 20.0], [-3.0, -8.0], [4.0, 9.0]), GenderRescaling("temperature", 0.8)
    )
    blend = BlendFile.of_weights({"scratch_cnn": 1.0}, {"scratch_cnn": 1.0}, 0.5, calibration)
    info = bundle_info(cfg, root, blend, members, "torch")
    return write_bundle(members, info, root / "bundle", "test-bundle")


def test_a_bundle_without_gender_names_says_gender_code_and_how_to_name_them(real_bundle, photo_dir, tmp_path, capsys):
    import tarfile

    from pipeline.exporting.torch_runtime import load_bundle, torch_runners

    with tarfile.open(real_bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = next(tmp_path.glob("*/bundle.json")).parent
    info = json.loads((folder / "bundle.json").read_text())
    del info["gender"]["labels_known"]  # a bundle of an earlier version: codes "0"/"1" as their own names
    info["gender"]["labels"] = {"0": "0", "1": "1"}
    (folder / "bundle.json").write_text(json.dumps(info))
    bundle = load_bundle(folder)
    assert not bundle.labels_known and bundle.gender_labels == {"0": "gender code 0", "1": "gender code 1"}
    out = tmp_path / "preds.csv"
    args = [str(folder), str(photo_dir / "astronaut.jpg"), "--out", str(out)]
    assert photos.predict_images_cli(args, torch_runners) == 0
    assert pd.read_csv(out).gender_label.iloc[0].startswith("gender code ")
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "data.gender_labels" in note[0]
    assert load_bundle(real_bundle).labels_known  # exported with gender_labels=male,female


def test_predict_images_with_a_real_bundle(real_bundle, photo_dir, tmp_path, capsys):
    from pipeline.exporting.torch_runtime import torch_runners

    out = tmp_path / "preds.csv"
    args = [str(real_bundle), str(photo_dir / "astronaut.jpg"), str(photo_dir / "no_face.png"), "--out", str(out)]
    assert photos.predict_images_cli([*args, "--whole-image", "--min-age", "18"], torch_runners) == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df.columns) == [*photos.COLUMNS, "gender_label", "at_least_18", "note"]
    assert df.face.tolist() == [0, -1]
    assert df.age.map(np.isfinite).all() and set(df.gender) <= {0, 1}
    assert ((df.age_low <= df.age) & (df.age <= df.age_high)).all()
    straddles = (df.age_low < 18) & (df.age_high >= 18)
    assert (df.at_least_18 == "unsure").tolist() == straddles.tolist()
    assert df.at_least_18.tolist() == [
        "unsure" if s else ("yes" if lo >= 18 else "no") for s, lo in zip(straddles, df.age_low)
    ]
    assert df.note.iloc[1] == "no face found: predicted on the whole image"
    assert "2 photos: 1 faces, 1 without a face, 0 unreadable" in capsys.readouterr().err


class CalibratedFakeBundle(FakeBundle):
    """FakeBundle with an interval of +-5 years around each age, as a calibrated bundle gives."""

    calibration = "fitted"
    info = SimpleNamespace(max_age=120.0)

    def predict(self, faces: list[np.ndarray]) -> pd.DataFrame:
        df = super().predict(faces)
        return df.assign(age_low=df.age - 5, age_high=df.age + 5)


def test_min_age_answers_unsure_exactly_when_the_interval_straddles_it(photo_dir):
    paths = [str(photo_dir / n) for n in ("astronaut.jpg", "group/thirty.png", "no_face.png")]
    ages = photos.predict_images(CalibratedFakeBundle(), paths).age.dropna()
    seen = set()
    for n in (float(np.floor(ages.min())) - 6, float(np.round(ages.median())), float(np.ceil(ages.max())) + 6):
        df = photos.predict_images(CalibratedFakeBundle(), paths, min_age=n)
        column = f"at_least_{n:g}"
        found = df[df.face >= 0]
        assert ((found[column] == "unsure") == ((found.age - 5 < n) & (found.age + 5 >= n))).all()
        assert ((found[column] == "yes") == (found.age - 5 >= n)).all()
        assert ((found[column] == "no") == (found.age + 5 < n)).all()
        assert df[df.face < 0][column].tolist() == [""]  # no face, no answer
        assert list(df.columns)[-2:] == [column, "note"]
        seen |= set(found[column])
    assert seen == {"yes", "no", "unsure"}
    none_found = photos.predict_images(CalibratedFakeBundle(), paths[2:], min_age=18)
    assert {"age_low", "age_high", "at_least_18"} <= set(none_found.columns)  # the same table without a face
    for bundle, n, why in ((FakeBundle(), 18, "needs age intervals"), (CalibratedFakeBundle(), 121, "above 120")):
        with pytest.raises(PipelineError, match=why):
            photos.predict_images(bundle, paths, min_age=n)


def test_many_photos_are_read_in_worker_processes_with_the_same_table(photo_dir, monkeypatch):
    """From POOL_FROM photos on, decoding and detection run in spawned processes a few photos ahead of the
    predictions: the table is the one a single process gives, row for row, bad files included."""
    paths = photos.photo_paths([str(photo_dir)]) * 2
    pools = []

    class SpyPool(imaging.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(imaging, "ProcessPoolExecutor", SpyPool)
    monkeypatch.setattr(photos, "POOL_FROM", 4)
    alone = photos.predict_images(FakeBundle(), paths, batch_size=8, workers=1)
    assert not pools
    pooled = photos.predict_images(FakeBundle(), paths, batch_size=8, workers=2)
    assert len(pools) == 1 and pools[0]["mp_context"].get_start_method() == "spawn"
    pd.testing.assert_frame_equal(pooled, alone)
    assert len(alone) == 2 * (7 + 30 + 1 + 4)


def test_detect_size_trades_small_faces_for_speed(photo_dir, fake_bundle_module, tmp_path, capsys):
    """--detect-size: the group photo's thirty faces are found on the default copy, few on a 128-pixel one."""
    group = str(photo_dir / "group" / "thirty.png")
    faces_found = {}
    for size in ("640", "128"):
        out = tmp_path / f"{size}.csv"
        assert photos.predict_images_cli(["BUNDLE", group, "--detect-size", size, "--out", str(out)]) == 0
        faces_found[size] = int((pd.read_csv(out).face >= 0).sum())
    assert faces_found["640"] == 30 and faces_found["128"] < 10
    assert photos.predict_images_cli(["BUNDLE", group, "--detect-size", "100"]) == 2
    assert photos.predict_images_cli(["BUNDLE", group, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "argument --detect-size: expected a whole number of pixels >= 128, got '100'" in err
    assert "error: --workers must be at least 1" in err and "Traceback" not in err


def test_ctrl_c_stops_the_workers_and_writes_nothing(real_bundle, photo_dir, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while worker processes read photos:
    exit 130, one line, no traceback from any process, no process left, no half-written CSV."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        (folder / f"{i:03d}.jpg").symlink_to(photo_dir / "astronaut.jpg")
    out = tmp_path / "preds.csv"
    args = cli_command("predict-images", real_bundle, folder, "--out", out, "--workers", 2)
    text = ctrl_c(args, lambda err: "/400 [" in err, settle=1.0, env=cli_env())
    assert text.rstrip().endswith("interrupted") and "Traceback" not in text, text[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".preds.csv.tmp*"))


def test_a_dead_worker_process_is_one_line_naming_the_photo(photo_dir, fake_bundle_module, monkeypatch, capsys):
    """A crash in a decoder or the detector kills a worker: the CLI names the photo and exits 2, no traceback."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class CrashingPool:  # runs the work in this process, except that the worker on gray.png dies
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, path):
            future = Future()
            if path.endswith("gray.png"):
                future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            else:
                future.set_result(fn(path))
            return future

    monkeypatch.setattr(imaging, "ProcessPoolExecutor", CrashingPool)
    monkeypatch.setattr(photos, "POOL_FROM", 2)
    assert photos.predict_images_cli(["BUNDLE", str(photo_dir), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert f"error: {photo_dir / 'gray.png'}: the worker process reading it died (a crash" in err
    assert "Traceback" not in err


def test_worker_processes_leave_ctrl_c_to_the_main_process():
    """An idle worker that got the terminal's SIGINT would print a traceback; the main process reports it."""
    ctx = imaging.multiprocessing.get_context("spawn")
    with imaging.ProcessPoolExecutor(1, mp_context=ctx, initializer=imaging.start_worker) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
