"""Export: the torch and ONNX bundles of a small blended run reproduce its submission, agree with each other,
load without unpickling (and without torch for ONNX), and refuse bad input with one line."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, cli, cli_command, cli_env, free_port, served, wait_for, write_config

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data.cache import decode_image
from pipeline.data.competition import load_competition
from pipeline.data.faces import native_face
from pipeline.data.imaging import square_resize
from pipeline.exporting.export import export, holdout_from_bundle, run_config
from pipeline.exporting.torch_runtime import load_bundle
from pipeline.serving import bundle as serving_bundle
from pipeline.serving import photos

ONE_EPOCH = [{"epochs": 1, "train": "all", "lr": 0.003}]
MODELS = [
    {"name": "scratch_cnn", "pretrained": False, "phases": ONE_EPOCH, "age_head": "dldl"},  # both heads exported
    {"name": "tf_efficientnet_lite0", "pretrained": False, "phases": ONE_EPOCH},
]


@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory):
    """A blended 2-model x 2-fold run at 32 px on the central 80% of each image (data.zoom), exported as torch and
    ONNX bundles."""
    root = tmp_path_factory.mktemp("export")
    data = {"root": demo_root, "img_size": 32, "zoom": 1.25}
    cfg_path = write_config(root / "cfg.yaml", data=data, models=MODELS)
    r = cli("run", cfg_path, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg, exp_dir = run_config(str(cfg_path), [], runs=root / "runs")
    torch_dir, torch_archive = export(cfg, exp_dir, "torch")
    named = replace(cfg, data=replace(cfg.data, gender_labels=["male", "female"]))  # data.gender_labels at export
    onnx_dir, onnx_archive = export(named, exp_dir, "onnx")
    comp = load_competition(cfg)
    submission = pd.read_csv(next((root / "submissions").glob("exp-*.csv")), dtype={"id": str}).set_index("id")
    return SimpleNamespace(
        root=root,
        cfg=cfg,
        exp_dir=exp_dir,
        torch_dir=torch_dir,
        torch_archive=torch_archive,
        onnx_dir=onnx_dir,
        onnx_archive=onnx_archive,
        comp=comp,
        submission=submission,
    )


def test_bundle_contents(run):
    info = json.loads((run.torch_dir / "bundle.json").read_text())
    blend = json.loads((run.exp_dir / "blend.json").read_text())
    assert run.torch_archive.name == "exp-bundle.tar.gz" and run.onnx_archive.name == "exp-bundle-onnx.tar.gz"
    assert [m["name"] for m in info["models"]] == ["scratch_cnn", "tf_efficientnet_lite0"]
    assert all(len(m["folds"]) == 2 and m["img_size"] == 32 for m in info["models"])
    assert [m["age_head"] for m in info["models"]] == ["dldl", "regression"]
    assert {m["name"]: m["age_weight"] for m in info["models"]} == blend["age_weights"]
    assert info["gender"]["threshold"] == blend["threshold"]
    assert info["tta"] == ["none", "hflip"] and info["fit"] == "center_crop" and info["face_crop"] == "none"
    assert info["zoom"] == 1.25
    # a Kaggle layout without data.gender_labels: the codes' names are unknown, and the bundle says how to name them
    assert info["gender"]["labels"] == {"0": "gender code 0", "1": "gender code 1"}
    assert info["gender"]["labels_known"] is False and "data.gender_labels" in info["gender"]["labels_from"]
    assert info["models"][1]["mean"] == pytest.approx([0.5, 0.5, 0.5])  # tf_efficientnet_lite0's own normalisation
    files = sorted(p.relative_to(run.torch_dir).as_posix() for p in run.torch_dir.rglob("*") if p.is_file())
    assert files == ["README.md", "bundle.json"] + [
        f"models/{m}/fold{k}.safetensors" for m in ("scratch_cnn", "tf_efficientnet_lite0") for k in (0, 1)
    ]
    card = (run.torch_dir / "README.md").read_text()
    assert "| blend |" in card and "torch 2" in card and "90 training images" in card
    assert "0 = gender code 0" in card and "data.gender_labels" in card
    assert "scratch_cnn: no pretrained weights" in card
    assert "tf_efficientnet_lite0 (tf_efficientnet_lite0.in1k): pretrained on ImageNet-1k; licence apache-2.0" in card
    onnx_info = json.loads((run.onnx_dir / "bundle.json").read_text())
    assert onnx_info["gender"]["labels"] == {"0": "male", "1": "female"} and onnx_info["runtime"] == "onnx"


@pytest.mark.parametrize("which", ["torch_dir", "torch_archive", "onnx_archive"])
def test_bundle_reproduces_the_submission(run, which):
    """The test images at their own resolution, squared by data.fit (native_face): the bundle's resize and zoom
    of them is what the pipeline cached and predicted."""
    faces = [native_face(p, run.cfg.data.fit) for p in run.comp.test.path]
    pred = load_bundle(getattr(run, which)).predict(faces, batch_size=7).set_index(run.comp.test.id)
    pred = pred.loc[run.submission.index]
    assert np.abs(pred.age.to_numpy() - run.submission.age.to_numpy()).max() < 1e-4
    assert (pred.gender.to_numpy() == run.submission.gender.to_numpy()).all()


def test_onnx_agrees_with_torch_on_any_size(run):
    rng = np.random.default_rng(0)
    faces = [decode_image(p, 48, "stretch") for p in run.comp.test.path[:10]]
    faces += [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 33), (90, 41), (1, 1), (300, 300))]
    t = load_bundle(run.torch_archive).predict(faces)
    o = load_bundle(run.onnx_dir).predict(faces, batch_size=3)
    for column in ("age", "age_low", "age_high"):
        assert np.abs(t[column] - o[column]).max() < 0.01
    assert np.abs(t.gender_prob - o.gender_prob).max() < 1e-4  # the calibrated probability
    assert set(o.gender_label) <= {"male", "female"}
    again = load_bundle(run.onnx_dir).predict(faces, batch_size=3)
    pd.testing.assert_frame_equal(o, again)  # deterministic
    columns = ["age", "age_low", "age_high", "gender_prob", "gender", "gender_label"]
    assert list(load_bundle(run.onnx_dir).predict([]).columns) == columns


def test_the_bundle_carries_the_blends_calibration(run):
    blend = json.loads((run.exp_dir / "blend.json").read_text())
    bundle = load_bundle(run.onnx_dir)
    c = blend["calibration"]
    assert bundle.calibration.to_json() == {k: c[k] for k in ("level", "age", "gender")}
    faces = [native_face(p, run.cfg.data.fit) for p in run.comp.test.path]
    pred = bundle.predict(faces)
    low, high = bundle.calibration.age.bounds(pred.age.to_numpy(), run.cfg.data.max_age)
    assert (pred.age_low.to_numpy() == low).all() and (pred.age_high == high).all()
    assert ((pred.age_low <= pred.age) & (pred.age <= pred.age_high)).all()
    assert "## Intervals and calibrated probabilities" in (run.onnx_dir / "README.md").read_text()


def test_an_old_bundle_without_calibration_loads_with_one_line_and_the_same_ages(run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run.onnx_dir, old)
    info = json.loads((old / "bundle.json").read_text())
    del info["calibration"]
    (old / "bundle.json").write_text(json.dumps(info))
    faces = [native_face(p, run.cfg.data.fit) for p in run.comp.test.path]
    capsys.readouterr()
    before = serving_bundle.load_bundle(old)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "no calibration" in note[0] and "intervals" in note[0]
    got, new = before.predict(faces), serving_bundle.load_bundle(run.onnx_dir).predict(faces)
    assert list(got.columns) == ["age", "gender_prob", "gender", "gender_label"]
    assert (got.age == new.age).all() and (got.gender == new.gender).all()
    # the probability as the models give it: the folds' and models' average, whose threshold the gender uses
    assert ((got.gender_prob >= before.threshold) == got.gender.astype(bool)).all()
    refused = cli("predict-images", old, run.comp.test.path.iloc[0], "--min-age", "18", cwd=tmp_path)
    assert refused.returncode == 2 and "--min-age needs age intervals" in refused.stderr


@pytest.mark.parametrize("zoom", [1.0, 1.25])
@pytest.mark.parametrize("fit", ["stretch", "center_crop", "pad"])
def test_resize_matches_the_training_decode(tmp_path, fit, zoom):
    rng = np.random.default_rng(1)
    for h, w in ((50, 70), (81, 30), (20, 20), (16, 40)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"{h}x{w}.png"  # lossless, so the file holds exactly `img`
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        assert np.array_equal(square_resize(img, 32, fit, zoom), decode_image(str(path), 32, fit, zoom=zoom))


def test_the_torch_free_loader_refuses_a_torch_bundle_in_one_line(run):
    with pytest.raises(PipelineError, match="holds torch weights") as e:
        serving_bundle.load_bundle(run.torch_archive)
    assert "\n" not in str(e.value) and "exporting.torch_runtime.load_bundle" in str(e.value)
    assert serving_bundle.load_bundle(run.onnx_archive).members


def test_loading_and_predicting_never_unpickle(run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a bundle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    face = [np.full((40, 40, 3), 128, np.uint8)]
    for path in (run.torch_archive, run.torch_dir, run.onnx_archive):
        assert len(load_bundle(path).predict(face)) == 1


SERVING_ONLY = REPO / "tests" / "serving_only"  # its sitecustomize.py makes the blocked packages unimportable
TRAINING_STACK = (
    "torch", "torchvision", "timm", "albumentations", "sklearn", "scipy", "yaml", "ray", "wandb", "matplotlib",
    "safetensors", "onnx", "onnxscript", "optuna",
)  # fmt: skip
FOR_GRADIO = ("yaml",)  # gradio's own dependency; pipeline/ itself never imports it there (tests/test_layers.py)


def serving_env(blocked=TRAINING_STACK) -> dict:
    """The CLI's environment on a machine with only requirements-serve.txt: every blocked package raises ImportError,
    in the process and in every process it spawns."""
    path = os.pathsep.join([str(SERVING_ONLY), str(REPO)])
    return cli_env({"PYTHONPATH": path, "BLOCKED_PACKAGES": ",".join(blocked)})


def serving_run(args: list, cwd, blocked=TRAINING_STACK, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=serving_env(blocked), capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, astronaut) -> Path:
    """A photo with a face, one without, and enough copies of the first for predict-images' worker processes."""
    d = tmp_path_factory.mktemp("photos")
    cv2.imwrite(str(d / "astronaut.jpg"), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(d / "no_face.png"), np.full((90, 120, 3), 100, np.uint8))
    for i in range(photos.POOL_FROM):
        shutil.copy(d / "astronaut.jpg", d / f"copy{i:02d}.jpg")
    return d


def test_the_serving_environment_cannot_import_the_training_stack(tmp_path):
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    try:\n        importlib.import_module(name)\n"
    code += "    except ImportError:\n        continue\n    sys.exit(f'{name} imported')\n"
    r = serving_run([sys.executable, "-c", code, *TRAINING_STACK], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    unblocked = subprocess.run([sys.executable, "-c", code, "torch"], env=cli_env(), capture_output=True, text=True)
    assert unblocked.returncode != 0 and "torch imported" in unblocked.stderr  # the check itself can fail


def test_onnx_bundle_and_predict_images_run_without_the_training_stack(run, photo_files, tmp_path):
    """An ONNX bundle loads and predicts, and predict-images (its decode and detect workers too) runs end to end,
    with none of torch, timm, scikit-learn, SciPy, PyYAML, Ray, W&B, matplotlib, safetensors or onnx importable."""
    code = (
        "import numpy as np\n"
        "from pipeline.serving.bundle import load_bundle\n"
        f"print(load_bundle({str(run.onnx_archive)!r}).predict([np.zeros((50, 40, 3), np.uint8)]).age[0])\n"
    )
    r = serving_run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) >= 0
    out = tmp_path / "faces.csv"
    r = serving_run(cli_command("predict-images", run.onnx_archive, photo_files, "--out", out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert len(df) == photos.POOL_FROM + 2 and (df.face >= 0).sum() == photos.POOL_FROM + 1
    assert df.age[df.face >= 0].between(0, 120).all() and df.note[df.face < 0].iloc[0].startswith("no face found")
    assert f"{photos.POOL_FROM + 2} photos: {photos.POOL_FROM + 1} faces" in r.stderr
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), np.full((60, 50, 3), 120, np.uint8))
    r = serving_run([sys.executable, "-m", "pipeline.serving.bundle", run.onnx_archive, face], cwd=tmp_path)
    assert r.returncode == 0 and "onnx bundle of exp" in r.stdout and "face.png" in r.stdout, r.stderr


def test_the_app_runs_without_the_training_stack(run, photo_files, tmp_path):
    """The page is served, and the code behind an upload predicts, with only requirements-serve.txt."""
    blocked = [p for p in TRAINING_STACK if p not in FOR_GRADIO]
    port = free_port()
    log = (tmp_path / "app.log").open("w")
    env = {**serving_env(blocked), "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    args = cli_command("app", run.onnx_archive, "--port", port)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        wait_for(lambda: served(proc, f"http://127.0.0.1:{port}/", tmp_path / "app.log"), timeout=180, every=0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        log.close()
    assert "Traceback" not in (tmp_path / "app.log").read_text()
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from pipeline.serving.app import analyse, build_page\n"
        "from pipeline.serving.bundle import load_bundle\n"
        "bundle = load_bundle(sys.argv[1])\n"
        "result = analyse(bundle, sys.argv[2:])\n"
        "build_page(bundle, Path('.'))\n"
        "print(result.lines)\n"
    )
    r = serving_run([sys.executable, "-c", code, run.onnx_archive, photo_files / "astronaut.jpg"], tmp_path, blocked)
    assert r.returncode == 0, r.stderr
    assert "astronaut.jpg: 1 face" in r.stdout


def _bundle_cli(*args, cwd, face: bool = False):
    if face:
        cv2.imwrite(str(Path(cwd) / "face.png"), np.full((60, 50, 3), 120, np.uint8))
    cmd = [sys.executable, "-m", "pipeline.serving.bundle", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=120)


def test_bad_bundles_are_refused_in_one_line(run, tmp_path):
    (tmp_path / "empty").mkdir()
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(run.torch_archive.read_bytes()[:5000])
    broken = tmp_path / "broken"
    for src in run.torch_dir.rglob("*"):
        if src.is_file():
            dst = broken / src.relative_to(run.torch_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    next(broken.rglob("*.safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    no_json = tmp_path / "nojson"
    no_json.mkdir()
    (no_json / "bundle.json").write_text("{")
    not_archive = tmp_path / "photo.jpg"
    not_archive.write_bytes(b"\xff\xd8 not an archive")
    plain_tar = tmp_path / "other.tar"
    with tarfile.open(plain_tar, "w") as tar:
        tar.add(not_archive, arcname="photo.jpg")
    bad_onnx = tmp_path / "bad_onnx"
    bad_onnx.mkdir()
    for src in run.onnx_dir.glob("*.json"):
        (bad_onnx / src.name).write_bytes(src.read_bytes())
    for f in json.loads((bad_onnx / "bundle.json").read_text())["models"][0]["folds"]:
        (bad_onnx / f["file"]).parent.mkdir(parents=True, exist_ok=True)
        (bad_onnx / f["file"]).write_bytes(b"garbage")
    damaged = []  # a calibration entry that would give NaN intervals or crash mid-prediction
    info = json.loads((run.onnx_dir / "bundle.json").read_text())
    for name, change in (
        ("nan_interval", lambda c: c["age"]["low"].__setitem__(0, float("nan"))),
        ("unsorted_edges", lambda c: c["age"].__setitem__("edges", c["age"]["edges"][::-1] + [-1.0])),
        ("empty_isotonic", lambda c: c.__setitem__("gender", {"method": "isotonic", "x": [], "y": []})),
        ("level", lambda c: c.__setitem__("level", 1.5)),
    ):
        folder = tmp_path / name
        shutil.copytree(run.onnx_dir, folder)
        entry = json.loads(json.dumps(info["calibration"]))
        change(entry)
        (folder / "bundle.json").write_text(json.dumps({**info, "calibration": entry}))
        damaged.append(folder)
    for bad in (tmp_path / "missing", tmp_path / "empty", truncated, broken, no_json, not_archive, plain_tar, bad_onnx,
                *damaged):  # fmt: skip
        with pytest.raises(PipelineError) as e:
            load_bundle(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    for bad in (tmp_path / "missing", broken):  # the CLI: one line, no traceback
        r = _bundle_cli(bad, cwd=tmp_path)
        assert r.returncode == 2, (bad, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ") and str(bad) in r.stderr
    ok = _bundle_cli(run.onnx_archive, tmp_path / "face.png", cwd=tmp_path, face=True)
    assert ok.returncode == 0 and "onnx bundle of exp" in ok.stdout and "face.png" in ok.stdout


def test_predict_refuses_what_is_not_a_face(run):
    bundle = load_bundle(run.onnx_dir)
    for bad in (
        [np.zeros((8, 8), np.uint8)],
        [np.zeros((8, 8, 3), np.float32)],
        ["face.jpg"],
        [np.zeros((0, 5, 3), np.uint8)],
    ):
        with pytest.raises(PipelineError, match="face 0"):
            bundle.predict(bad)


def test_export_refuses_without_a_blend(run, tmp_path):
    exp_dir = tmp_path / "runs" / "exp"
    exp_dir.mkdir(parents=True)
    with pytest.raises(PipelineError, match="blend.json not found"):
        export(run.cfg, exp_dir)
    with pytest.raises(PipelineError, match="format='zip' is not valid"):
        export(run.cfg, run.exp_dir, "zip")
    other = write_config(tmp_path / "other.yaml", experiment="never_run")
    r = cli("export", other, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "no such experiment" in r.stderr


def test_export_takes_the_gender_codes_names_from_a_config_override(run, tmp_path):
    """data.gender_labels given to export names the codes in the bundle, over the run's saved config (none there)."""
    shutil.copytree(run.exp_dir, tmp_path / "runs" / "exp", ignore=shutil.ignore_patterns("bundle*", "*.tar.gz"))
    r = cli("export", run.root / "cfg.yaml", "--format", "onnx", "data.gender_labels=[female,male]", cwd=tmp_path)
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout + r.stderr
    info = json.loads((tmp_path / "runs" / "exp" / "bundle-onnx" / "bundle.json").read_text())
    assert info["gender"]["labels"] == {"0": "female", "1": "male"} and info["gender"]["labels_known"] is True
    assert info["gender"]["labels_from"] == "the config's data.gender_labels"
    r = cli("export", run.root / "cfg.yaml", "data.gender_labels=[female]", cwd=tmp_path)  # the config's own check
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "data.gender_labels" in r.stderr, r.stderr


UTKFACE_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "utkface"
UTKFACE_RUN = Path(__file__).resolve().parents[1] / "runs" / os.environ.get("EXPORT_RUN", "utkface_cpu")


@pytest.mark.utkface
@pytest.mark.skipif(os.environ.get("UTKFACE") != "1", reason="opt-in: set UTKFACE=1")
@pytest.mark.skipif(not UTKFACE_ROOT.is_dir(), reason=f"{UTKFACE_ROOT} is absent")
@pytest.mark.skipif(not (UTKFACE_RUN / "blend.json").is_file(), reason=f"no blended run in {UTKFACE_RUN}")
def test_utkface_holdout_from_the_bundle_equals_the_runs_own():
    """The real run's held-out figures recomputed from its ONNX bundle (exported if absent) on the image files."""
    cfg = load_config(UTKFACE_RUN / "config.yaml", [f"data.root={UTKFACE_ROOT}"])
    folder = UTKFACE_RUN / "bundle-onnx"
    if not (folder / "bundle.json").is_file():
        export(cfg, UTKFACE_RUN, "onnx")
    bundle = load_bundle(folder)
    assert bundle.info.gender.labels == {"0": "male", "1": "female"}
    got = holdout_from_bundle(bundle, cfg)
    own = json.loads((UTKFACE_RUN / "blend.json").read_text())["holdout"]
    assert got == pytest.approx(own, abs=1e-4)
