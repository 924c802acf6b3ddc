"""Pretrained weights through timm's hub names and the Hugging Face cache, offline: a cache folder built by hand
(as huggingface_hub lays it out) stands in for the hub; nothing downloads. Weights are read only by folds that
start training: predict, blend and export of a trained run work with the cache gone. And models[].weights in the
forms people carry weights in: a timm folder with its config.json, a torchvision .pth, a hub repo's cache folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import cli, write_config
from safetensors.torch import save_file

from pipeline.core.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.models.backbones import check_weights, create_model, weights_record

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
    assert "model.safetensors, tag a1_in1k (normalised with mean (0.485, 0.456, 0.406)" in out
    record = json.loads((root / "runs/exp/resnet18.a1_in1k/fold1/start_weights.json").read_text())
    assert record["file"].endswith(f"{REVISION}/model.safetensors") and record["tag"] == "a1_in1k"
    assert record["mean"] == pytest.approx([0.485, 0.456, 0.406])
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
    for args in (("predict", cfg), ("run", cfg), ("export", cfg, "--format", "torch")):  # run: the blend, no training
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


def _backbone(m: ModelConfig) -> dict:
    return {k.removeprefix("backbone."): v for k, v in create_model(m).state_dict().items() if "backbone." in k}


def test_a_timm_folder_with_its_config_json_gives_its_own_normalisation(tmp_path):
    torch.manual_seed(1)
    state = timm.create_model("convnext_atto").state_dict()
    folder = tmp_path / "convnext-weights"  # as a Kaggle dataset of a hub download holds it
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    pretrained = {"tag": "d2_in1k", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": 1000}
    (folder / "config.json").write_text(json.dumps({"architecture": "convnext_atto", "pretrained_cfg": pretrained}))
    model = create_model(ModelConfig(name="convnext_atto", weights=str(folder)))
    assert torch.equal(model.mean.flatten(), torch.full((3,), 127.5)) and torch.equal(model.std, model.mean)
    half = [0.5, 0.5, 0.5]
    assert weights_record(model) == {
        "file": str(folder / "model.safetensors"),
        "tag": "d2_in1k",
        "mean": half,
        "std": half,
    }
    got = _backbone(ModelConfig(name="convnext_atto", weights=str(folder)))
    assert all(torch.equal(got[k], state[k]) for k in got) and set(got) == {k for k in state if "head.fc" not in k}

    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "pretrained_cfg": pretrained}))
    with pytest.raises(PipelineError, match="config.json beside it is for resnet18, not convnext_atto"):
        check_weights(ModelConfig(name="convnext_atto", weights=str(folder)))


def test_a_torchvision_resnet_file_loads_as_timms_resnet(tmp_path):
    import torchvision

    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "resnet18-f37072fd.pth")  # torchvision's own file name and layout
    got = _backbone(ModelConfig(name="resnet18", weights=str(tmp_path / "resnet18-f37072fd.pth")))
    assert set(got) == {k for k in tv if not k.startswith("fc.")}
    assert all(torch.equal(got[k], tv[k]) for k in got)


def test_a_hub_repo_cache_folder_is_read_at_its_main_revision(tmp_path):
    torch.manual_seed(3)
    state = timm.create_model("resnet18").state_dict()
    root = hub_cache(tmp_path, "timm/resnet18.a1_in1k", state)
    repo = root / "models--timm--resnet18.a1_in1k"
    got = _backbone(ModelConfig(name="resnet18", weights=str(repo)))
    assert all(torch.equal(got[k], state[k]) for k in got)


def test_weights_that_do_not_fit_are_one_line(tmp_path):
    save_file(timm.create_model("resnet34").state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(
        PipelineError, match=r"^model 'resnet18': weights .*safetensors do not fit it \(unexpected 80: "
    ) as e:
        create_model(ModelConfig(name="resnet18", weights=str(tmp_path)))  # timm itself only logs a warning
    assert "\n" not in str(e.value)
    partial = {k: v for k, v in timm.create_model("resnet18").state_dict().items() if not k.startswith("layer4.")}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(PipelineError, match=r"do not fit it \(missing 25: layer4.0.conv1.weight, "):
        create_model(ModelConfig(name="resnet18", weights=str(tmp_path)))  # timm: an info line, random layer4
    for name in ("a.pth", "b.pth"):
        torch.save({}, tmp_path / name)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match=r"several weights files \(a.pth, b.pth\); name one"):
        check_weights(ModelConfig(name="resnet18", weights=str(tmp_path)))
