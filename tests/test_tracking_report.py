"""A tiny experiment tracked by W&B offline: the offline runs hold the logged metrics; the report and its
plots exist and carry the blend's numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.tracking import wandb_mode

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
experiment: tracked
data: {{root: {root}, img_size: 32, cache_dir: {cache}}}
folds: {{n_splits: 2, seed: 0}}
models:
  - {{name: small, arch: scratch_cnn, pretrained: false, phases: [{{epochs: 2, train: all, lr: 0.003}}]}}
  - {{name: small_40px, arch: scratch_cnn, pretrained: false, img_size: 40,
      phases: [{{epochs: 1, train: head, lr: 0.003}}, {{epochs: 2, train: "last:2", lr: 0.003}}]}}
"""


@pytest.fixture(scope="module")
def tracked(demo_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tracked")
    cfg = workdir / "c.yaml"
    cfg.write_text(CONFIG.format(root=demo_root, cache=workdir / "cache"))
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "HOME": str(workdir)}
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(cfg)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return workdir / "runs" / "tracked", r.stdout


def test_wandb_offline_runs_hold_the_logged_metrics(tracked):
    exp, _ = tracked
    runs = sorted((exp / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 * 2 + 1  # one per (model, fold) and one for the blend
    raws = [next(r.glob("run-*.wandb")).read_bytes() for r in runs]
    for model in ("small", "small_40px"):
        for k in (0, 1):
            metrics = pd.read_csv(exp / model / f"fold{k}" / "metrics.csv")
            name = f"{model}-fold{k}".encode()
            (raw,) = [r for r in raws if name in r]
            for v in metrics.val_score:
                assert repr(float(v)).encode() in raw  # every epoch's validation score was logged
            for key in (
                b"val_mae",
                b"val_loss",
                b"lr_end",
                b"train_loss",
                b"img_per_s",
                b"best_val_score",
                b"oof_tta_score",
                b"phase",
            ):
                assert key in raw
    blend = json.loads((exp / "blend.json").read_text())
    (raw,) = [r for r in raws if b"weights/age/small" in r]
    assert repr(blend["cv"]).encode() in raw and b"oof_table" in raw


def test_report_and_plots_carry_the_numbers(tracked):
    exp, stdout = tracked
    blend = json.loads((exp / "blend.json").read_text())
    page = (exp / "report.html").read_text()
    assert f"{blend['cv']:.4f}" in page and f"CV score: {blend['cv']:.4f}" in stdout
    for model in ("small", "small_40px", "blend"):
        assert f"<th>{model}</th>" in page
        assert f"{blend['table'][model]['mae']:.4f}" in page
    for section in ("Learning curves", "By age bin", "By gender", "training images used"):
        assert section in page
    pngs = sorted(p.name for p in (exp / "plots").glob("*.png"))
    assert pngs == [
        "blend_weights.png",
        "gender_confusion.png",
        "learning_curves.png",
        "mae_by_age.png",
        "pred_vs_true.png",
    ]
    for p in (exp / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert page.count("data:image/png;base64,") == 5  # self-contained: the plots are embedded


def test_report_groups_by_race_on_utkface_names(tmp_path):
    from pipeline.report import group_table

    oof = pd.DataFrame(
        {
            "age_true": [20.0, 30, 40, 50],
            "age_blend": [22.0, 30, 41, 50],
            "gender_true": [0, 1, 0, 1],
            "prob_blend": [0.1, 0.9, 0.2, 0.4],
        }
    )
    t = group_table(oof, pd.Series(["White", "White", "Asian", "Asian"], name="race"), 0.5)
    assert t.loc["White", "mae"] == 1.0 and t.loc["Asian", "mae"] == 0.5
    assert t.loc["White", "accuracy"] == 1.0 and t.loc["Asian", "accuracy"] == 0.5 and t.loc["Asian", "n"] == 2


def test_wandb_modes(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(None)
    assert wandb_mode(cfg) == "offline"  # not logged in: offline, never a network wait
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(cfg) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(cfg) == "offline"
    assert wandb_mode(load_config(None, ["tracking.wandb=false"])) == "disabled"
