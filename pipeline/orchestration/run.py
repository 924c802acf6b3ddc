"""The stages end to end: folds -> train -> predict -> blend; each one can also run alone."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..core.config import Config, config_changes, dump_config
from ..core.errors import OutOfTime, PipelineError
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
from ..core.session import kaggle
from ..data.competition import load_competition
from ..data.demo import make_demo
from ..data.folds import ensure_folds
from ..inference.blend import blend
from ..models.backbones import check_name, check_weights, pretraining
from ..training.job import check_compile, check_device
from .budget import Budget, Stops, stop_if_stopped
from .jobs import fold_started, fold_todo, model_images, run_fold
from .outputs import output_line
from .parallel import RunSpec, job_slots, run_parallel
from .resume import earlier_experiment, take_over

STAGES = ("folds", "train", "predict", "blend", "run")


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
        changed = config_changes(json.loads(saved.read_text()), cfg)
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
        if cfg.launcher == "local":
            job_slots(cfg)  # local.jobs beyond the GPUs or cores: refused before anything is written
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
    earlier = earlier_experiment(cfg) if cfg.resume_from else None  # refused now, before anything is written
    for m in models:  # starting weights are read only by folds that start training: refused now, too
        check_name(m)
        started = [
            fold_started(fold_dir(exp_dir, m.name, k)) or bool(earlier and fold_started(fold_dir(earlier, m.name, k)))
            for k in folds_to_run
        ]
        if stage in ("train", "run") and not all(started):
            check_weights(m)
    if stage in ("run", "blend", "folds"):
        with exclusive(exp_dir / LOCK, f"experiment {cfg.experiment!r}"):
            return _run(stage, cfg, models, folds_to_run, t0, earlier)
    return _run(stage, cfg, models, folds_to_run, t0, earlier)


def _run(
    stage: str, cfg: Config, models: list, folds_to_run: list[int], t0: float, earlier: Path | None = None
) -> Path | None:
    """The stages under the experiment's lock (run, blend, folds); `earlier`: resume_from's experiment folder."""
    exp_dir = experiment_dir(cfg.experiment)
    for folder in (exp_dir, FOLDS_DIR, SUBMISSIONS):  # leftovers of a killed run
        remove_stale_temporaries(folder)
    if earlier is not None:
        take_over(cfg, earlier)
    exp_dir = claim_experiment(cfg)
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
            started = time.time() - (time.perf_counter() - t0)
            comp = _run_local(stage, cfg, models, folds_to_run, comp, folds, exp_dir, started)
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


def _run_local(
    stage: str,
    cfg: Config,
    models: list,
    folds_to_run: list[int],
    comp,
    folds,
    exp_dir: Path,
    start: float | None = None,
):
    """Every unfinished (model, fold) job, local.jobs at once (one: in this process, one after another), within the
    time budget (from `start`, time.time() of the run's start; default now). Returns the competition the blend uses."""
    session = kaggle()
    slots = job_slots(cfg)
    todo = [(m, k) for m in models for k in folds_to_run if fold_todo(stage, fold_dir(exp_dir, m.name, k))]
    start = time.time() if start is None else start
    budget = Budget.plan(cfg, session, todo if stage != "predict" else [], exp_dir, len(slots), start)
    for line in (
        budget.start_line(session),
        session and output_line(cfg, session, models, len(folds_to_run), len(slots), len(comp.train) + len(comp.test)),
    ):
        if line:
            print(line)
    if stage != "predict":
        for m in models:
            print(f"weights: {pretraining(m)}")
    used, stops = comp, Stops()
    if len(slots) > 1:
        for m in models:  # every model's image cache, built here once; the jobs' processes read them
            used, _ = model_images(comp, cfg, m)
        stops = run_parallel(stage, cfg, todo, RunSpec(comp, folds, exp_dir, slots, budget))
    else:
        for m in models:
            if stops:
                stops.held_back = True
                break
            used, images = model_images(comp, cfg, m)
            for k in folds_to_run:
                out = fold_dir(exp_dir, m.name, k)
                if stage != "predict" and fold_todo(stage, out) and not budget.job_fits(m.name):
                    stops.held_back = True
                    break
                try:
                    run_fold(stage, cfg, m, k, used, images, folds, out, exp_dir, callbacks=[budget])
                except OutOfTime as e:
                    stops.stopped[m.name, k] = str(e)
                    break
    stop_if_stopped(budget, stage, exp_dir, [(m.name, k) for m in models for k in folds_to_run], stops)
    return used
