"""A Kaggle session's rules, in-process and fast: detection and its default paths, the budget's parsing and its
epoch-end decision, local.jobs' slots on simulated GPUs, resume_from's refusals, the output estimate and the
pretraining line."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from pipeline.core.config import Config, ConfigError, DataConfig, ModelConfig, load_config
from pipeline.core.errors import OutOfTime, PipelineError
from pipeline.core.session import budget_seconds, default_cache_dir, duration_text, kaggle, parse_duration
from pipeline.models.backbones import pretraining
from pipeline.orchestration import outputs, parallel
from pipeline.orchestration.budget import Budget, Stops, stop_if_stopped
from pipeline.orchestration.resume import earlier_experiment, take_over


@pytest.fixture
def on_kaggle(tmp_path, monkeypatch):
    """A Kaggle notebook session whose /kaggle is a temporary folder, run from its working folder."""
    root = tmp_path / "kaggle"
    for d in ("working", "temp", "input"):
        (root / d).mkdir(parents=True)
    monkeypatch.setenv("AGEGENDER_KAGGLE_ROOT", str(root))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.chdir(root / "working")
    return root


def test_kaggle_is_detected_and_moves_caches_to_scratch(on_kaggle):
    session = kaggle()
    assert session is not None and session.root == on_kaggle
    assert DataConfig().cache_folder == str(on_kaggle / "temp" / "agegender-cache") == default_cache_dir()
    assert DataConfig(cache_dir="mine").cache_folder == "mine"  # a chosen folder is kept
    assert budget_seconds("auto", session) == 11.5 * 3600
    assert session.saves(on_kaggle / "working" / "runs") and not session.saves(on_kaggle / "temp")


def test_elsewhere_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert kaggle() is None and DataConfig().cache_folder == "runs/cache"
    assert budget_seconds("auto", None) is None
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")  # the variable without Kaggle's folders
    monkeypatch.setenv("AGEGENDER_KAGGLE_ROOT", str(tmp_path / "nothing"))
    assert kaggle() is None


@pytest.mark.parametrize(
    "text,seconds", [("11h30m", 41400), ("90m", 5400), ("45s", 45), ("1.5h", 5400), ("2h 5m 3s", 7503)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["11x", "h", "10", "5m5m", "-3m", "1h30"])
def test_a_budget_that_does_not_parse_is_refused_in_one_line(text):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"budget={text}"])
    assert "budget=" in str(e.value) and "11h30m" in str(e.value) and "\n" not in str(e.value)


def test_duration_text():
    assert [duration_text(s) for s in (41400, 1500, 40, 3599)] == ["11h30m", "25m00s", "40s", "59m59s"]


def _trainer(name="m", fold=0, phases=(1, 2)):
    phases = [SimpleNamespace(epochs=e) for e in phases]
    return SimpleNamespace(
        job=SimpleNamespace(model=SimpleNamespace(name=name), fold=fold, name=f"{name} fold {fold}"), phases=phases
    )


def _end(epoch, phase, seconds):
    return SimpleNamespace(epoch=epoch, row={"phase": phase, "seconds": seconds})


def test_the_budget_stops_when_the_next_epoch_would_not_fit(capsys):
    budget = Budget(seconds=100, start=time.time() - 50, epochs_left={("m", 0): 1, ("m", 1): 2}, first_fold={"m": 0})
    budget(_trainer(), _end(1, 1, 10))  # 50 s used, the next epoch (another phase: the longest so far) fits
    assert "the run should take about" in capsys.readouterr().out
    budget(_trainer(), _end(2, 2, 45))  # 50 + 45 <= 100: the third epoch, 45 s again, fits
    with pytest.raises(OutOfTime, match="m fold 0 after epoch 2 of 3"):
        budget.start -= 10  # 60 + 45 > 100: it does not
        budget(_trainer(), _end(2, 2, 45))
    budget(_trainer(), _end(3, 2, 45))  # a fold's last epoch: it predicts next, never stopped here
    assert budget.job_fits("m")  # 60 s used: the next fold's first epoch (phase 1: 10 s) fits
    budget.start -= 35
    assert not budget.job_fits("m")  # 95 s used: it does not


def test_the_estimate_warns_when_the_run_will_not_fit(capsys):
    budget = Budget(seconds=60, start=time.time(), jobs=2, epochs_left={("m", 0): 11}, first_fold={"m": 0})
    budget(_trainer(phases=(12,)), _end(1, 1, 20))  # 10 epochs x 20 s left, on 2 jobs: about 100 s
    out = capsys.readouterr().out
    assert "about 1m40s in all" in out and "warning: more than the budget of 1m00s" in out
    budget(_trainer(fold=1, phases=(12,)), _end(1, 1, 20))  # only the model's first fold prints
    assert capsys.readouterr().out == ""


def test_the_stop_line_says_what_is_done_where_each_job_stopped_and_what_did_not_start(tmp_path):
    exp = tmp_path / "exp"
    (exp / "m" / "fold0").mkdir(parents=True)
    for marker in ("train_done.json", "predict_done.json"):
        (exp / "m" / "fold0" / marker).write_text("{}")
    stops = Stops({("m", 1): "m fold 1 after epoch 3 of 5"})
    with pytest.raises(OutOfTime) as e:
        stop_if_stopped(Budget(3600, time.time()), "run", exp, [("m", 0), ("m", 1), ("m", 2), ("n", 0)], stops)
    line = str(e.value)
    assert "done: m fold 0; stopped: m fold 1 after epoch 3 of 5; not started: m fold 2, n fold 0" in line
    assert "resume_from=" in line and "\n" not in line
    stop_if_stopped(Budget(3600, time.time()), "run", exp, [("m", 0)], Stops())  # nothing stopped: no stop


def test_jobs_get_one_simulated_gpu_each(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = Config()
    assert parallel.job_slots(cfg) == [0, 1]  # auto: one job per GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert parallel.job_slots(cfg) == [2, 3]  # pinned to the GPUs this notebook was given
    cfg.local.jobs = "1"
    assert parallel.job_slots(cfg) == [2]
    cfg.local.jobs = "3"
    with pytest.raises(PipelineError, match=r"local.jobs=3: 2 GPU\(s\) are visible here"):
        parallel.job_slots(cfg)


def test_jobs_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 4)
    cfg = Config()
    assert parallel.job_slots(cfg) == [None]  # auto without a GPU: one job, in this process
    cfg.local.jobs = "4"
    assert parallel.job_slots(cfg) == [None] * 4
    cfg.local.jobs = "5"
    with pytest.raises(PipelineError, match=r"local.jobs=5: this machine has 4 usable CPU core\(s\)"):
        parallel.job_slots(cfg)
    with pytest.raises(ConfigError, match="local.jobs"):
        load_config(None, ["local.jobs=two"])


def _earlier_output(folder, cfg: Config):
    exp = folder / "runs" / cfg.experiment
    (exp / "scratch_cnn" / "fold0").mkdir(parents=True)
    (exp / "config.json").write_text(json.dumps(cfg.to_dict()))
    (exp / "scratch_cnn" / "fold0" / "last.pt").write_bytes(b"checkpoint")
    (folder / "folds").mkdir()
    (folder / "folds" / "demo-k5-s42.csv").write_text("id,fold\n")
    return exp


def test_resume_from_refuses_what_it_cannot_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "input" / "notebook-output"
    earlier.mkdir(parents=True)
    cfg = Config(resume_from=str(tmp_path / "missing"))
    with pytest.raises(PipelineError, match="resume_from=.*missing: no such folder"):
        earlier_experiment(cfg)
    cfg.resume_from = str(earlier)
    with pytest.raises(PipelineError, match="it holds no runs/ folder"):
        earlier_experiment(cfg)
    _earlier_output(earlier, Config(experiment="other"))
    with pytest.raises(PipelineError, match="no runs of experiment 'demo' \\(it has: other\\)"):
        earlier_experiment(cfg)
    _earlier_output(tmp_path / "input" / "second", Config(folds=Config().folds.__class__(n_splits=3)))
    cfg.resume_from = str(tmp_path / "input" / "second")
    with pytest.raises(PipelineError, match="was run with another config \\(changed: folds.n_splits\\)"):
        earlier_experiment(cfg)


def test_resume_from_copies_in_what_is_missing_and_reads_only(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    earlier = tmp_path / "input" / "out"
    cfg = Config(resume_from=str(earlier.parent))  # one folder up: runs/ is found a level down
    _earlier_output(earlier, cfg)
    before = {p: p.stat().st_mtime_ns for p in earlier.rglob("*")}
    take_over(cfg, earlier_experiment(cfg))
    assert (work / "runs/demo/scratch_cnn/fold0/last.pt").read_bytes() == b"checkpoint"
    assert (work / "folds/demo-k5-s42.csv").is_file() and (work / "runs/demo/config.json").is_file()
    (work / "runs/demo/scratch_cnn/fold0/last.pt").write_bytes(b"this session's")
    take_over(cfg, earlier_experiment(cfg))  # a fold this session has gone on with is its own
    assert (work / "runs/demo/scratch_cnn/fold0/last.pt").read_bytes() == b"this session's"
    assert before == {p: p.stat().st_mtime_ns for p in earlier.rglob("*")}


def test_the_output_line_on_kaggle(on_kaggle, monkeypatch):
    cfg = Config(models=[ModelConfig(name="scratch_cnn")])
    line = outputs.output_line(cfg, kaggle(), cfg.models, 5, 2, 1000)
    assert line.startswith(f"kaggle: outputs under {on_kaggle / 'working'} about 0.0 GB")
    assert "agegender-cache (scratch, not saved)" in line
    monkeypatch.setattr(outputs, "parameter_count", lambda m: 10**9)  # 4 GB a checkpoint
    line = outputs.output_line(cfg, kaggle(), cfg.models, 5, 2, 1000)
    assert line.startswith("warning: kaggle: outputs") and "more than Kaggle keeps" in line and "\n" not in line
    monkeypatch.chdir(on_kaggle / "temp")
    assert "Kaggle saves none of it" in outputs.output_line(cfg, kaggle(), cfg.models, 5, 1, 1000)


def test_pretraining_says_where_the_weights_come_from():
    assert "JFT-300M" in pretraining(ModelConfig(name="tf_efficientnet_b4.ns_jft_in1k"))
    line = pretraining(ModelConfig(name="convnextv2_tiny.fcmae_ft_in22k_in1k"))
    assert "ImageNet-22k then ImageNet-1k" in line and "licence cc-by-nc-4.0" in line
    assert pretraining(ModelConfig(name="scratch_cnn")).endswith("no pretrained weights (random init)")


def test_the_gpu_recipe_starts_from_imagenet_only_weights():
    cfg = load_config(REPO / "configs" / "utkface_gpu.yaml")
    for m in cfg.models:
        line = pretraining(m)
        assert "ImageNet" in line and not any(w in line for w in ("JFT", "LAION", "Instagram", "CLIP")), line
