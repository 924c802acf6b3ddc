"""Pretrained weights through timm's hub names and the Hugging Face cache, offline: a cache folder built by hand
(as huggingface_hub lays it out) stands in for the hub; nothing downloads. Weights are read only by folds that
start training: predict, blend and export of a trained run work with the cache gone."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import cli, write_config
from safetensors.torch import save_file

REVISION = "0123456789abcdef0123456789abcdef01234567"
HEAD_PHASE = [{"epochs": 1, "train": "head", "lr": 0.003}]


def hub_cache(root: Path, repo: str, state: dict) -> Path:
    """A Hugging Face cache with one snapshot of `repo`: refs/main (the revision, no newline), model.safetensors."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return root


def offline(cache: Path) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root):
    """A 2-fold run of resnet18 (named with its tag) whose pretrained weights are seeded random ones in the cache."""
    torch.manual_seed(7)
    state = timm.create_model("resnet18").state_dict()
    root = tmp_path_factory.mktemp("hub")
    cache = hub_cache(root / "hub", "timm/resnet18.a1_in1k", state)
    models = [{"name": "resnet18.a1_in1k", "phases": HEAD_PHASE}]
    cfg = write_config(root / "cfg.yaml", data={"root": demo_root}, models=models)
    r = cli("run", cfg, cwd=root, env=offline(cache))
    assert r.returncode == 0, r.stdout + r.stderr
    return root, cfg, state, r.stdout


def test_the_frozen_weights_are_the_caches_bit_for_bit(trained):
    root, _, state, out = trained
    assert out.count("resnet18.a1_in1k: weights ") == 1  # said once, though both folds load them
    assert "model.safetensors (normalised with mean (0.485, 0.456, 0.406)" in out
    best = torch.load(root / "runs/exp/resnet18.a1_in1k/fold0/best.pt", weights_only=True)["model"]
    backbone = {k.removeprefix("backbone."): v for k, v in best.items() if k.startswith("backbone.")}
    assert set(backbone) == {k for k in state if not k.startswith("fc.")}  # the classifier is not the network's
    for key, value in backbone.items():
        assert torch.equal(value, state[key]), key  # a head phase: every backbone tensor as loaded


def test_a_trained_run_predicts_blends_and_exports_without_the_weights(trained, tmp_path):
    root, cfg, _, _ = trained
    gone = offline(tmp_path / "empty")
    for fold in (root / "runs/exp/resnet18.a1_in1k").glob("fold*"):
        for name in ("oof.csv", "test.csv", "predict_done.json"):
            (fold / name).unlink()
    for args in (("predict", cfg), ("run", cfg), ("export", cfg, "format=torch")):  # run: the blend, no training
        r = cli(*args, cwd=root, env=gone)
        assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "runs/exp/bundle/bundle.json").is_file()


def test_uncached_weights_offline_are_one_line_and_nothing_is_written(demo_root, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", data={"root": demo_root}, models=[{"name": "resnet18"}])
    r = cli("run", cfg, cwd=tmp_path, env=offline(tmp_path / "empty"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "hub timm/resnet18.a1_in1k" in r.stderr, r.stderr
    assert str(tmp_path / "empty") in r.stderr and "models[].weights" in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "folds").exists()
