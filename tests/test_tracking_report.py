"""A tiny experiment tracked by W&B offline: the offline runs hold the logged metrics; the report and its
plots exist and carry the blend's numbers."""

import json
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, write_config

from pipeline.core.config import load_config
from pipeline.core.tracking import wandb_mode

MODELS = [
    {
        "name": "small",
        "arch": "scratch_cnn",
        "pretrained": False,
        "phases": [{"epochs": 2, "train": "all", "lr": 0.003}],
    },
    {
        "name": "small_40px",
        "arch": "scratch_cnn",
        "pretrained": False,
        "img_size": 40,
        "phases": [{"epochs": 1, "train": "head", "lr": 0.003}, {"epochs": 2, "train": "last:2", "lr": 0.003}],
    },
]


@pytest.fixture(scope="module")
def tracked(demo_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tracked")
    cfg = write_config(
        workdir / "c.yaml",
        experiment="tracked",
        data={"root": demo_root, "cache_dir": workdir / "cache"},
        folds={"seed": 0},
        models=MODELS,
        train={"batch_size": 64},
    )
    r = cli("run", cfg, cwd=workdir, env={"WANDB_MODE": "offline", "HOME": str(workdir)})
    assert r.returncode == 0, r.stdout + r.stderr
    return workdir / "runs" / "tracked", r.stdout


def wandb_records(path: Path):
    """The records of an offline run's `.wandb` file, as W&B's own protobuf messages.

    The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-style
    32 KiB blocks of chunks (crc32 over type byte + data, uint16 length, type full/first/middle/last), each
    record a serialised wandb.proto.wandb_internal_pb2.Record. wandb 0.31 has no Python reader for it any more
    (the Go core writes and syncs it), so this is the format's reference reader, with its checksums verified."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), f"{path}: not a W&B log"
    block, pos, pending = 32768, 7, b""
    while pos < len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad chunk"
        assert kind in (1, 2, 3, 4) and (kind in (1, 2)) == (not pending), f"{path}: broken chunk sequence"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # full or last chunk: a whole record
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
    assert not pending, f"{path}: ends inside a record"


def read_offline_run(run_dir: Path) -> dict:
    """name, group, config, history (one dict per log call), summary, artifacts and exit code of an offline run."""

    def items(update):
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}

    (log,) = run_dir.glob("run-*.wandb")
    run = {"history": [], "summary": {}, "config": {}, "artifacts": {}, "exit_code": None}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group)
            run["config"].update(items(record.run.config.update))
        elif kind == "config":
            run["config"].update(items(record.config.update))
        elif kind == "history":
            run["history"].append(items(record.history.item))
        elif kind == "summary":
            run["summary"].update(items(record.summary.update))
        elif kind == "artifact":
            run["artifacts"][record.artifact.type] = sorted(e.path for e in record.artifact.manifest.contents)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def test_wandb_offline_runs_hold_the_logged_metrics(tracked):
    exp, _ = tracked
    runs = {r["name"]: r for r in map(read_offline_run, sorted((exp / "wandb").glob("offline-run-*")))}
    names = [f"{m['name']}-fold{k}" for m in MODELS for k in (0, 1)]
    assert sorted(runs) == sorted([*names, "blend"])  # one per (model, fold) and one for the blend
    for run in runs.values():
        assert run["group"] == "tracked" and run["config"]["experiment"] == "tracked" and run["exit_code"] == 0
    for model in MODELS:
        for k in (0, 1):
            metrics = pd.read_csv(exp / model["name"] / f"fold{k}" / "metrics.csv")
            run = runs[f"{model['name']}-fold{k}"]
            assert [m["name"] for m in run["config"]["models"]] == [m["name"] for m in MODELS]
            epochs = [row for row in run["history"] if "epoch" in row]
            assert [row["epoch"] for row in epochs] == metrics.epoch.tolist()  # one history row per epoch
            for row, (_, expected) in zip(epochs, metrics.iterrows()):
                assert row["fold"] == k and row["phase"] == expected.phase and row["train"] == expected.train
                for key in ("val_score", "val_mae", "val_rmse", "val_loss", "train_loss", "lr_end"):
                    assert row[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), (run["name"], key)
                assert row["img_per_s"] > 0
            best = metrics.loc[metrics.val_score.idxmax()]
            assert run["summary"]["best_val_score"] == pytest.approx(best.val_score, rel=1e-12)
            assert run["summary"]["best_epoch"] == best.epoch
            predicted = json.loads((exp / model["name"] / f"fold{k}" / "predict_done.json").read_text())
            assert run["summary"]["oof_tta_score"] == pytest.approx(predicted["oof"]["score"], rel=1e-12)
    blend = json.loads((exp / "blend.json").read_text())
    run = runs["blend"]
    assert run["summary"]["cv_score"] == pytest.approx(blend["cv"], rel=1e-12)
    for model in ("small", "small_40px"):
        assert f"weights/age/{model}" in run["summary"] and f"weights/gender/{model}" in run["summary"]
        assert run["summary"][f"oof/{model}/mae"] == pytest.approx(blend["table"][model]["mae"], rel=1e-12)
    assert any("oof_table" in key for row in run["history"] for key in row)
    submission = Path(blend["submission"]).name
    assert run["artifacts"]["submission"] == sorted(["oof_blend.csv", submission])


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
        "reliability.png",
    ]
    for p in (exp / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert "Calibrated answers" in page and f"{blend['calibration']['oof']['coverage']:.3f}" in page
    assert page.count("data:image/png;base64,") == 6  # self-contained: the plots are embedded


def test_report_groups_by_race_on_utkface_names(tmp_path):
    from pipeline.inference.report import group_table

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
