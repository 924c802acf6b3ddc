import json
from dataclasses import replace

import pytest
from conftest import REPO, write_config

from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import PipelineError
from pipeline.orchestration.cli import main
from pipeline.orchestration.run import claim_experiment


def test_defaults_and_dotted_overrides(tmp_path):
    path = write_config(tmp_path / "c.yaml", experiment="x", models=[{"name": "scratch_cnn", "pretrained": False}])
    cfg = load_config(path, ["train.batch_size=4", "models.0.img_size=40", "train.phases.0.epochs=3", "tta=[none]"])
    assert cfg.experiment == "x" and cfg.data.img_size == 32 and cfg.folds.n_splits == 2  # from the file
    assert cfg.train.batch_size == 4 and cfg.train.weight_decay == 1e-4  # overridden / default
    assert cfg.models[0].img_size == 40 and cfg.models[0].pretrained is False
    assert cfg.train.phases[0].epochs == 3
    assert cfg.tta == ["none"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.batch_sise=8", ["train.batch_sise", "batch_size"]),
        ("train.age_loss=huber", ["huber", "l1", "smoothl1", "mse"]),
        ("data.on_error=ignore", ["skip", "fail"]),
        ("train.phases.0.train=middle", ["head", "all", "last:N"]),
        ("tta=[rot90]", ["rot90", "hflip", "zoom"]),
        ("train.mixup=-1", ["train.mixup=-1", "Beta"]),
        ("train.batch_size=many", ["train.batch_size", "int"]),
        ("folds.n_splits=1", ["n_splits"]),
        ("tta=[]", ["tta", "none", "hflip"]),
        ("train.batch_size=0", ["train.batch_size=0", "positive"]),
        ("models.0.batch_size=-4", ["models.0.batch_size=-4", "positive"]),
        ("models.0.img_size=-1", ["models.0.img_size", "positive"]),
        ("data.fit=squash", ["center_crop", "stretch", "pad"]),
        ("folds.age_bins=[0, 20, 10]", ["age_bins", "increasing"]),
        ("models.0.name=blend", ["blend"]),
        ("train.batch_size=[", ["train.batch_size", "not a valid value"]),
        ("train.gender_smoothing=1", ["train.gender_smoothing=1", "below 1"]),
        ("models.0.age_head=corn", ["regression", "dldl", "meanvar", "coral"]),
    ],
)
def test_bad_keys_and_values_are_refused_with_choices(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_cli_refuses_bad_config_without_traceback(capsys, tmp_path):
    path = write_config(tmp_path / "c.yaml", experiment="x", metric="auc")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: metric='auc' is not valid") and "Traceback" not in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("experiment: [x\n")
    assert main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_text_overrides_stay_as_typed_and_useless_overrides_are_refused():
    cfg = load_config(None, ["data.name=010", "experiment=2024_01", "train.normalize_age=false", "tta=[none]"])
    assert (
        cfg.data.name == "010"
        and cfg.experiment == "2024_01"
        and cfg.train.normalize_age is False
        and cfg.tta == ["none"]
    )
    with pytest.raises(ConfigError, match="no epochs"):
        load_config(None, ["train.phases.0.epochs=0", "train.phases.1.epochs=0"])
    with pytest.raises(ConfigError, match="every model sets its own phases"):
        load_config(REPO / "configs" / "utkface_cpu.yaml", ["train.phases.0.epochs=9"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    from pipeline.models.backbones import check_name

    cfg = load_config(path)
    assert cfg.models and all(cfg.phases(m) for m in cfg.models)
    for m in cfg.models:
        check_name(m)  # a timm name, and a tag it has


def test_the_kaggle_offline_config_is_the_gpu_recipe_with_weights_from_datasets():
    gpu, kaggle = (load_config(REPO / "configs" / f"{name}.yaml") for name in ("utkface_gpu", "kaggle_offline"))
    assert all(m.weights.startswith("/kaggle/input/") for m in kaggle.models)
    assert [replace(m, weights="") for m in kaggle.models] == gpu.models
    assert (kaggle.train, kaggle.folds, kaggle.tta) == (gpu.train, gpu.folds, gpu.tta)


def test_an_experiment_saved_before_a_setting_existed_keeps_its_identity(tmp_path, monkeypatch):
    """Upgrading the code must not make earlier experiments 'changed': a key missing from the saved config is a
    setting added since, which at its default changes nothing; set to anything else, it is a change."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["experiment=old", "models=[{name: scratch_cnn, phases: [{epochs: 1}]}]"])
    exp = claim_experiment(cfg)
    saved = json.loads((exp / "config.json").read_text())
    del saved["train"]["mixup"], saved["models"][0]["pseudo_labels"]  # as written by older code
    (exp / "config.json").write_text(json.dumps(saved))
    assert claim_experiment(cfg) == exp
    with pytest.raises(PipelineError, match="changed: train.mixup"):
        claim_experiment(replace(cfg, train=replace(cfg.train, mixup=0.2)))
    with pytest.raises(PipelineError, match=r"changed: models.0.phases.0.epochs"):
        claim_experiment(load_config(None, ["experiment=old", "models=[{name: scratch_cnn, phases: [{epochs: 2}]}]"]))


def test_train_amp_saved_as_true_or_false_reads_as_auto_or_off(tmp_path, monkeypatch):
    """train.amp was a bool before it named a precision: old configs load, and old experiments keep their identity."""
    monkeypatch.chdir(tmp_path)
    for old, new in ((True, "auto"), (False, "off")):
        (tmp_path / "c.yaml").write_text(f"experiment: e{new}\ntrain: {{amp: {str(old).lower()}}}\n")
        cfg = load_config(tmp_path / "c.yaml")
        assert cfg.train.amp == new
        exp = claim_experiment(cfg)
        saved = json.loads((exp / "config.json").read_text())
        saved["train"]["amp"] = old  # as written by older code
        (exp / "config.json").write_text(json.dumps(saved))
        assert claim_experiment(cfg) == exp
    with pytest.raises(ConfigError, match="train.amp='yes' is not valid; choose one of: auto, bf16, fp16, off"):
        load_config(None, ["train.amp=yes"])


def test_the_key_reference_is_up_to_date():
    """docs/CONFIG.md is generated from the fields of core/config.py; after changing a key, regenerate it with
    `python -m pipeline.core.config > docs/CONFIG.md`."""
    from pipeline.core.config import reference

    assert (REPO / "docs" / "CONFIG.md").read_text() == reference(), (
        "docs/CONFIG.md is out of date: python -m pipeline.core.config > docs/CONFIG.md"
    )
