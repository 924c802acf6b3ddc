"""The agegender distribution: the wheel holds the package, its recipes and the face detector's model and nothing
of a checkout's data; its command runs ours from any folder; an unsupported Python and a missing extra are one line."""

from __future__ import annotations

import glob
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from conftest import REPO, cli_env, write_config

from pipeline.core import extras
from pipeline.orchestration import cli


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of this checkout's sources (so that the build leaves nothing in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", out]
    r = subprocess.run([*map(str, cmd), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (found,) = out.glob("agegender-*-py3-none-any.whl")
    return found


def test_the_wheel_holds_the_package_recipes_and_detector_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith(("pipeline/", "agegender-"))]
    assert outside == []
    assert {f"pipeline/configs/{c.name}" for c in (REPO / "pipeline" / "configs").glob("*.yaml")} <= set(names)
    for needed in (
        "data/yunet/face_detection_yunet_2023mar.onnx",
        "data/yunet/LICENSE",
        "exporting/kaggle-requirements.txt",
    ):
        assert f"pipeline/{needed}" in names
    assert not [n for n in names if n.endswith((".csv", ".npy", ".pt", ".pth", ".jpg", ".png", ".pyc"))]
    assert not [n for n in names if n.split("/")[1] in ("tests", "runs", "folds", "submissions", "notebooks")]
    assert wheel.stat().st_size < 1 << 20


def test_the_metadata_declares_ranges_extras_and_the_command(wheel):
    with zipfile.ZipFile(wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(info).decode())
        entry = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert meta["Name"] == "agegender" and meta["Requires-Python"] in (">=3.10,<3.14", "<3.14,>=3.10")
    requires = meta.get_all("Requires-Dist")
    pins = [r.split(";")[0] for r in requires]
    assert not [p for p in pins if "==" in p]  # ranges; the exact pins live in requirements.txt
    assert not [p for p in pins if ">=" not in p and not p.startswith("agegender[")]  # each from a tested version up
    assert set(meta.get_all("Provides-Extra")) >= {"train", "serve", "export", "app", "ray", "kaggle", "test", "lint"}
    assert any(r.startswith("torch>=") and 'extra == "train"' in r for r in requires)
    assert not any(r.startswith("torch") and "extra" not in r for r in requires)  # the core is torch-free
    assert "agegender = pipeline.orchestration.cli:main" in entry


def test_the_installed_command_is_ours_beside_a_stray_pipeline_package(wheel, tmp_path):
    """Kaggle utility scripts leave a pipeline.py (or pipeline/) in the working folder: the command ignores them."""
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    work = tmp_path / "work"
    (work / "pipeline").mkdir(parents=True)
    (work / "pipeline" / "__init__.py").write_text("raise SystemExit('the stray pipeline/ was imported')\n")
    (work / "pipeline.py").write_text("raise SystemExit('the stray pipeline.py was imported')\n")
    env = {**cli_env(), "PYTHONPATH": str(site)}  # the installed copy only, not this checkout
    command = [sys.executable, str(site / "bin" / "agegender")]
    r = subprocess.run([*command, "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "agegender run" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*command, "folds", "no-such-recipe"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "packaged recipe by name: demo, kaggle_offline, utkface_cpu" in r.stderr, r.stderr
    assert str(site) in subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=tmp_path, env=env, capture_output=True,
        text=True,
    ).stdout  # fmt: skip


def test_a_packaged_recipe_loads_by_name():
    from pipeline.core.config import load_config

    assert load_config("demo").experiment == "demo" and load_config("utkface_gpu").data.img_size > 128


def test_an_unsupported_python_is_one_line(tmp_path):
    found = sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.9.*/bin/python3.9")))
    if not found:
        pytest.skip("no Python 3.9 under pyenv to try")
    r = subprocess.run(
        [found[-1], "-m", "pipeline", "run", "demo"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "Python 3.9 is not supported: agegender runs on Python 3.10 to 3.13" in r.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(extras.PipelineError, match="Python 3.14 is not supported"):
        extras.check_python((3, 14))
    extras.check_python((3, 10))


def hide(monkeypatch, *modules: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else find_spec(name, *a))


def test_a_missing_extra_is_one_line_naming_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml")
    hide(monkeypatch, "ray", "gradio")
    assert cli.main(["run", str(cfg), "launcher=ray"]) == 2
    err = capsys.readouterr().err
    assert err == "error: launcher=ray needs the 'ray' extra (ray not installed): pip install 'agegender[ray]'\n"
    assert cli.main(["tune", str(cfg)]) == 2 and "pip install 'agegender[ray]'" in capsys.readouterr().err
    assert cli.main(["app", "bundle.tar.gz"]) == 2
    assert (
        capsys.readouterr().err
        == "error: app needs the 'app' extra (gradio not installed): pip install 'agegender[app]'\n"
    )
    hide(monkeypatch, "torch")
    assert cli.main(["run", str(cfg)]) == 2 and "pip install 'agegender[train]'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]
