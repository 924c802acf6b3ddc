"""One per-model image step for every launcher (orchestration/jobs.model_images): with an unreadable training image
and two models of one size, the local launcher, and the Ray driver with its workers, each decode one image cache.
(A chained step gave the second model the first one's filtered rows: another image list, so a second cache.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import write_config

from pipeline.core.config import load_config
from pipeline.core.layout import experiment_dir
from pipeline.data.competition import load_competition
from pipeline.data.folds import ensure_folds
from pipeline.orchestration import launch, run

TWO_OF_ONE_SIZE = [
    {"name": "scratch_cnn", "pretrained": False},
    {"name": "scratch_cnn_b", "arch": "scratch_cnn", "pretrained": False},
]


@pytest.fixture
def setup(demo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "comp"
    shutil.copytree(demo_root, root)
    (root / "train" / "train_00007.jpg").write_bytes(b"")  # unreadable: skipped, with on_error=skip
    data = {"root": root, "cache_dir": tmp_path / "cache"}
    cfg = load_config(str(write_config(tmp_path / "cfg.yaml", data=data, models=TWO_OF_ONE_SIZE)))
    comp = load_competition(cfg)
    jobs = []

    def run_fold(stage, cfg, m, k, comp, *rest, **options):  # the job itself is not under test: what it was given is
        jobs.append((m.name, k, len(comp.train)))

    monkeypatch.setattr(run, "run_fold", run_fold)
    monkeypatch.setattr(launch, "run_fold", run_fold)
    return cfg, comp, ensure_folds(cfg, comp), jobs


def train_caches(cfg) -> list:
    return sorted(p.name for p in Path(cfg.data.cache_dir).glob("*-train-32px-*.npy"))


def test_the_local_launcher_decodes_one_cache_for_two_models_of_one_size(setup):
    cfg, comp, folds, jobs = setup
    used = run._run_local("train", cfg, cfg.models, [0, 1], comp, folds, experiment_dir(cfg.experiment))
    assert len(train_caches(cfg)) == 1
    assert len(used.train) == len(comp.train) - 1 and len(used.skipped) == len(comp.skipped) + 1
    assert {n for _, _, n in jobs} == {len(used.train)}  # every job trains on the readable rows


def test_the_ray_driver_and_its_workers_decode_one_cache_for_two_models_of_one_size(setup, monkeypatch):
    """Ray itself replaced by a stand-in that runs each task here (test_ray.py runs a real cluster)."""
    cfg, comp, folds, jobs = setup

    class InProcessRay:
        def shutdown(self):
            pass

    def submit(ray, stage, cfg, wave, given, folds):
        for m, k in wave:
            launch.fold_task(launch.JobSpec(stage, cfg, m, k, ".", {}), given, folds)
        return {}

    monkeypatch.setattr(launch, "connect", lambda cfg: InProcessRay())
    monkeypatch.setattr(launch, "submit", submit)
    monkeypatch.setattr(launch, "collect", lambda *args: None)
    monkeypatch.setattr(launch, "worker_threads", lambda cfg: None)
    monkeypatch.setattr(launch, "node_name", lambda: "here")
    used = launch.run_on_ray("train", cfg, cfg.models, [0, 1], comp, folds, experiment_dir(cfg.experiment))
    assert len(train_caches(cfg)) == 1
    assert len(used.train) == len(comp.train) - 1
    assert sorted(jobs) == [(m["name"], k, len(used.train)) for m in TWO_OF_ONE_SIZE for k in (0, 1)]
