"""The stages end to end: folds -> train -> predict -> blend; each one can also run alone."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..core.config import Config, ModelConfig, Phase, TrainConfig, changes_results, dump_config, upgrade_legacy
from ..core.errors import PipelineError
from ..core.files import exclusive, remove_stale_temporaries, write_text
from ..core.layout import (
    CONFIG_JSON,
    CONFIG_YAML,
    DATA_REPORT,
    DEMO_ROOT,
    FOLDS_DIR,
    LOCK,
    PREDICT_DONE,
    SUBMISSIONS,
    TRAIN_DONE,
    PredictDone,
    TrainDone,
    experiment_dir,
    fold_dir,
)
from ..data.competition import load_competition
from ..data.demo import make_demo
from ..data.folds import ensure_folds
from ..inference.blend import blend
from ..models.backbones import check_name, check_weights
from ..training.job import check_compile, check_device
from .jobs import fold_started, model_images, run_fold

STAGES = ("folds", "train", "predict", "blend", "run")


def _flatten(d: dict, prefix: str = "") -> dict:
    """Dotted keys to values, into dicts and lists of dicts (models.0.age_head)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.update(_flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = v
    return out


def _defaults_like(cfg: Config) -> dict:
    """Every key's default value, for a config with as many models and phases as `cfg`."""
    models = [ModelConfig(phases=[Phase() for _ in m.phases]) for m in cfg.models]
    train = TrainConfig(phases=[Phase() for _ in cfg.train.phases])
    return _flatten(replace(Config(), models=models, train=train).to_dict())


def print_fold_summary(exp_dir: Path, models: list, folds_to_run: list[int], metric: str) -> None:
    """Best validation epoch and score of every fold, and its TTA OOF score once predicted."""
    print(f"\n{'model':<30}{'fold':>5}{'best epoch':>12}{'val ' + metric:>12}{'OOF (TTA)':>12}")
    for m in models:
        for k in folds_to_run:
            d = fold_dir(exp_dir, m.name, k)
            done = TrainDone.read(d) if (d / TRAIN_DONE).is_file() else None
            oof = ""
            if (d / PREDICT_DONE).is_file():  # its OOF figures were computed when it was written
                oof = f"{PredictDone.read(d).oof[metric]:.4f}"
            epoch, val = (done.best_epoch, f"{done.value:.4f}") if done else ("-", "-")
            print(f"{m.name:<30}{k:>5}{epoch:>12}{val:>12}{oof:>12}")


def claim_experiment(cfg: Config) -> Path:
    """Save the resolved config with the run; refuse to mix a changed config into an existing experiment."""
    exp_dir = experiment_dir(cfg.experiment)
    saved = exp_dir / CONFIG_JSON
    current = cfg.to_dict()
    if saved.is_file():
        old = _flatten(upgrade_legacy(json.loads(saved.read_text())))
        new = _flatten(current)
        # a key the saved config does not have is a setting added to the code since: at its default it changes nothing;
        # keys declared changes_results=False (how and where jobs run, tracking, tuning) are not compared
        defaults = _defaults_like(cfg)
        changed = [
            k for k in sorted(set(old) | set(new)) if old.get(k, defaults.get(k)) != new.get(k) and changes_results(k)
        ]
        if changed:
            raise PipelineError(
                f"experiment {cfg.experiment!r} already exists in {exp_dir} with a different config "
                f"(changed: {', '.join(changed[:6])}). Results are never mixed: pass experiment=NEW_NAME "
                "for a new experiment, or delete that folder"
            )
    else:
        write_text(json.dumps(current, indent=1), saved)
        write_text(dump_config(cfg), exp_dir / CONFIG_YAML)
    return exp_dir


def check_gpu_here(cfg: Config) -> None:
    """A GPU of this machine that the installed torch cannot run is refused before anything is written (a remote Ray
    cluster's workers check their own, training.job.pick_device)."""
    from .launch import is_local_address

    if cfg.launcher != "ray" or is_local_address(cfg.ray.address):
        check_device(cfg)


def run(stage: str, cfg: Config, model: str | None = None, fold: int | None = None) -> Path | None:
    if stage not in STAGES:
        raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if stage in ("train", "predict", "run"):
        check_gpu_here(cfg)
    if cfg.data.root == "demo":
        cfg = replace(cfg, data=replace(cfg.data, root=str(make_demo(DEMO_ROOT)), name=cfg.data.name or "demo"))
    models = [cfg.model(model)] if model else cfg.models
    if fold is not None and not 0 <= fold < cfg.folds.n_splits:
        raise PipelineError(f"--fold {fold}: folds are 0..{cfg.folds.n_splits - 1}")
    folds_to_run = [fold] if fold is not None else list(range(cfg.folds.n_splits))
    t0 = time.perf_counter()
    exp_dir = experiment_dir(cfg.experiment)
    if stage in ("train", "run"):
        check_compile(cfg)
    for m in models:  # starting weights are read only by folds that start training: refused now, before any writing
        check_name(m)
        if stage in ("train", "run") and not all(fold_started(fold_dir(exp_dir, m.name, k)) for k in folds_to_run):
            check_weights(m)
    if stage in ("run", "blend", "folds"):
        with exclusive(exp_dir / LOCK, f"experiment {cfg.experiment!r}"):
            return _run(stage, cfg, models, folds_to_run, t0)
    return _run(stage, cfg, models, folds_to_run, t0)


def _run(stage: str, cfg: Config, models: list, folds_to_run: list[int], t0: float) -> Path | None:
    exp_dir = claim_experiment(cfg)
    for folder in (exp_dir, FOLDS_DIR, SUBMISSIONS):  # leftovers of a killed run
        remove_stale_temporaries(folder)
    comp = load_competition(cfg)
    print(
        f"data: {comp.name}: {len(comp.train)} training images, {len(comp.test)} test images, "
        f"{len(comp.skipped)} skipped"
    )
    folds = ensure_folds(cfg, comp)
    if stage == "folds":
        return None

    if stage in ("train", "predict", "run"):
        if cfg.launcher == "ray":
            from .launch import run_on_ray

            comp = run_on_ray(stage, cfg, models, folds_to_run, comp, folds, exp_dir)
        else:
            comp = _run_local(stage, cfg, models, folds_to_run, comp, folds, exp_dir)
        print_fold_summary(exp_dir, models, folds_to_run, cfg.metric)
        if comp.face_crop:
            print(comp.face_crop_line())
        write_text(json.dumps(comp.report(), indent=1), exp_dir / DATA_REPORT)
        if comp.skipped:
            print(f"data report: {len(comp.skipped)} skipped rows/files, listed in {exp_dir / DATA_REPORT}")
    if stage in ("blend", "run"):
        path = blend(cfg, comp, exp_dir, SUBMISSIONS)
        print(f"{stage} finished in {time.perf_counter() - t0:.0f}s")
        return path
    print(f"{stage} finished in {time.perf_counter() - t0:.0f}s")
    return None


def _run_local(stage: str, cfg: Config, models: list, folds_to_run: list[int], comp, folds, exp_dir: Path):
    """Every (model, fold) job in this process, one after another. Returns the competition the blend uses."""
    used = comp
    for m in models:
        used, images = model_images(comp, cfg, m)
        for k in folds_to_run:
            run_fold(stage, cfg, m, k, used, images, folds, fold_dir(exp_dir, m.name, k), exp_dir)
    return used
