"""python -m pipeline tune: Ray Tune trials over the config's tune.space, Optuna as the searcher, ASHA stopping
weak trials early on the validation metric of every epoch. Each trial is a real training of tune.model on
tune.folds with its own config (the base config plus the trial's key=value overrides). Output: a table of
trials sorted by the metric, runs/<experiment>/tune/trials.csv and tune/best.yaml, which ./run.sh accepts."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from ..core.config import Config, ConfigError, SearchParam, dump_config, load_config
from ..core.errors import PipelineError
from ..core.files import write_csv, write_text
from ..core.layout import BEST_YAML, DEMO_ROOT, SEARCH, TRIAL_DONE, TRIALS, TRIALS_CSV, TrialDone, fold_dir, tune_dir
from ..core.metrics import HIGHER_IS_BETTER, is_better
from ..core.tracking import Tracker
from ..data.competition import load_competition
from ..data.demo import make_demo
from ..data.folds import ensure_folds
from ..training.train import EpochEnd, FoldTrainer
from .jobs import model_images, run_fold, worker_threads

MAX_EPOCHS = 1000  # ASHA's max_t: above any trial's epochs; rungs sit at grace_epochs * reduction_factor^n
SHORTHANDS = {"trials": "tune.trials={}", "folds": "tune.folds=[{}]"}


def tune_overrides(trials: int | None = None, folds: list[int] | None = None) -> list[str]:
    """The command line's --trials N and --folds 0,1 as tune.* config overrides (none for what was not given)."""
    out = [] if trials is None else [SHORTHANDS["trials"].format(trials)]
    return out if folds is None else [*out, SHORTHANDS["folds"].format(",".join(map(str, folds)))]


def param_overrides(params: dict) -> list[str]:
    return [f"{key}={value}" for key, value in params.items()]


def check_space(cfg: Config, path: str, overrides: list[str]) -> None:
    """Every point at the edges of the space must make a valid config; refused now, before any trial runs."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: list the keys to search, e.g. {key: train.gender_weight, ...}")
    for p in cfg.tune.space:
        for value in p.values if p.kind == "choice" else (p.low, p.high):
            load_config(path, [*overrides, f"{p.key}={int(value) if p.kind == 'int' else value}"])


def search_space(space: list[SearchParam]) -> dict:
    from ray import tune

    def dim(p: SearchParam):
        if p.kind == "loguniform":
            return tune.loguniform(p.low, p.high)
        if p.kind == "uniform":
            return tune.uniform(p.low, p.high)
        if p.kind == "int":
            return tune.randint(int(p.low), int(p.high) + 1)
        return tune.choice(list(p.values))

    return {p.key: dim(p) for p in space}


@dataclass(frozen=True)
class TrialBase:
    """What every trial starts from."""

    path: str  # the config file
    overrides: tuple[str, ...]  # the command line's overrides, and the demo data's resolved root
    cwd: str  # the driver's working folder (runs/, folds/, relative data paths)
    out: str  # runs/<experiment>/tune/trials, absolute


class ReportToTune:
    """An epoch-end callback: each epoch's validation metric, and the trial's CV so far (the folds done and this
    fold's best epoch), reported to Tune, whose ASHA scheduler may stop the trial there."""

    def __init__(self, metric: str, done: list[float]):
        self.metric, self.done, self.best = metric, done, None

    def __call__(self, trainer: FoldTrainer, end: EpochEnd) -> None:
        from ray import tune

        value = end.metrics[self.metric]
        if self.best is None or is_better(self.metric, value, self.best):
            self.best = value
        cv = sum([*self.done, self.best]) / (len(self.done) + 1)
        tune.report({"val": value, "cv": cv, "fold": trainer.job.fold, "epoch": end.epoch})


def quiet_sigterm_exit(unraisable) -> None:
    """sys.unraisablehook for a trial's worker. Ray stops a trial that ASHA ended by sending its worker SIGTERM, and
    Ray's handler raises SystemExit in whatever Python code the main thread is running. When that is a weakref or
    __del__ callback, Python cannot raise it there and prints "Exception ignored ... Traceback ... SystemExit" on
    the user's console. The worker is being stopped on purpose: say nothing (Ray still ends the process)."""
    if not issubclass(unraisable.exc_type, SystemExit):
        sys.__unraisablehook__(unraisable)


def run_trial(params: dict, base: TrialBase) -> None:
    """One trial: train tune.model on each of tune.folds with the base config plus `params`."""
    from ray import tune

    sys.unraisablehook = quiet_sigterm_exit

    params = {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}  # numpy scalars from the searcher
    os.chdir(base.cwd)  # Tune starts trials in their own folder
    cfg = load_config(base.path, [*base.overrides, *param_overrides(params)])
    worker_threads(cfg)
    m = cfg.model(cfg.tune.model) if cfg.tune.model else cfg.models[0]
    comp = load_competition(cfg)
    folds = ensure_folds(cfg, comp)
    comp, images = model_images(comp, cfg, m)
    out = Path(base.out) / tune.get_context().get_trial_id()
    done: list[float] = []
    for k in cfg.tune.folds:
        tracker = Tracker(cfg, f"{out.name}-{m.name}-fold{k}", "tune", out)
        report = ReportToTune(cfg.metric, done)
        run_fold("train", cfg, m, k, comp, images, folds, fold_dir(out, m.name, k), out, tracker, [report])
        done.append(report.best)
    TrialDone(params, cfg.metric, sum(done) / len(done)).write(out)


def tune(cfg: Config, path: str, overrides: list[str]) -> Path:
    """Run (or continue after a crash) the search; print the trials table and write tune/best.yaml."""
    from .launch import connect, job_resources
    from .run import check_gpu_here, claim_experiment

    t0 = time.perf_counter()
    if not cfg.ray.shared_fs:
        raise PipelineError("tune: trials write under runs/ (and Tune keeps its state there): needs ray.shared_fs=true")
    check_space(cfg, path, overrides)
    check_gpu_here(cfg)
    exp_dir = claim_experiment(cfg)
    trial_overrides = list(overrides)
    if cfg.data.root == "demo":
        trial_overrides.append(f"data.root={make_demo(DEMO_ROOT).resolve()}")
    comp = load_competition(load_config(path, trial_overrides))
    ensure_folds(cfg, comp)  # once, here: trials only read it
    storage = tune_dir(exp_dir).resolve()
    base = TrialBase(path, tuple(trial_overrides), os.getcwd(), str(storage / TRIALS))
    ray = connect(cfg)  # before any other ray import: a local cluster stays on loopback
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then means quiet: the trials table comes at the end
    from ray import tune as rt

    try:
        cpus, gpus = job_resources(ray, cfg)
        trainable = rt.with_resources(rt.with_parameters(run_trial, base=base), {"cpu": cpus, "gpu": gpus})
        grid = restore_or_start(rt, trainable, cfg, storage)
        results = grid.fit()
    finally:
        if cfg.ray.address == "":
            ray.shutdown()
    table = trials_table(results, cfg, storage / TRIALS)
    return write_best(cfg, path, overrides, table, storage, t0)


def restore_or_start(rt, trainable, cfg: Config, storage: Path):
    """Tune's experiment restore when this search was started before (a driver crash); else a new search."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    path = storage / SEARCH
    if rt.Tuner.can_restore(str(path)):
        print(f"tune: continuing the search in {path} (delete it to start over)")
        return rt.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    mode = "max" if HIGHER_IS_BETTER[cfg.metric] else "min"
    t = cfg.tune
    return rt.Tuner(
        trainable,
        param_space=search_space(t.space),
        tune_config=rt.TuneConfig(
            search_alg=OptunaSearch(metric="val", mode=mode, seed=t.seed),
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                metric="val",
                mode=mode,
                max_t=MAX_EPOCHS,
                grace_period=t.grace_epochs,
                reduction_factor=t.reduction_factor,
            ),
            num_samples=t.trials,
        ),
        run_config=rt.RunConfig(name=SEARCH, storage_path=str(storage), verbose=0),
    )


def trials_table(results, cfg: Config, trials_dir: Path) -> pd.DataFrame:
    """One row per trial: how it ended (ok, stopped by ASHA, error), epochs run, the mean over its folds of their
    best validation metric (for a stopped trial: so far), its parameters. Best first."""
    rows = []
    for r in results:
        m = r.metrics or {}
        trial = m.get("trial_id", "?")
        done = trials_dir / trial / TRIAL_DONE
        state = "error" if r.error else "ok" if done.is_file() else "stopped"
        rows.append(
            {
                "trial": trial,
                "state": state,
                "epochs": m.get("training_iteration", 0),
                f"cv_{cfg.metric}": m.get("cv", math.nan),
                **(r.config or {}),
                "error": last_line(r.error) if r.error else "",
            }
        )
    table = pd.DataFrame(rows)
    table["_rank"] = table.state.map({"ok": 0, "stopped": 1, "error": 2})
    key = f"cv_{cfg.metric}"
    table = table.sort_values(["_rank", key], ascending=[True, not HIGHER_IS_BETTER[cfg.metric]])
    return table.drop(columns="_rank").reset_index(drop=True)


def last_line(e) -> str:
    """The last non-empty line of an error's text: for a Ray trial error, the exception its traceback ends with."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def write_best(cfg: Config, path: str, overrides: list[str], table: pd.DataFrame, storage: Path, t0: float) -> Path:
    """Print the table; best.yaml = the base config with the best finished trial's values, as a new experiment."""
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(table.drop(columns="error").to_string(index=False))
    write_csv(table, storage / TRIALS_CSV)
    finished = table[table.state == "ok"]
    if finished.empty:
        errors = table.error[table.error != ""]
        raise PipelineError(f"tune: no trial finished ({errors.iloc[0] if len(errors) else 'all were stopped'})")
    best = finished.iloc[0]
    params = TrialDone.read(storage / TRIALS / best.trial, cfg.metric).params
    best_cfg = load_config(path, [*overrides, *param_overrides(params)])
    chosen_on = sorted({*best_cfg.folds.chosen_on, *cfg.tune.folds})  # the blend scores the other folds apart
    best_cfg = replace(
        best_cfg, experiment=f"{cfg.experiment}-tuned", folds=replace(best_cfg.folds, chosen_on=chosen_on)
    )
    out = storage / BEST_YAML
    write_text(dump_config(best_cfg), out)
    score = best[f"cv_{cfg.metric}"]
    print(f"tune: {len(table)} trials in {time.perf_counter() - t0:.0f}s; best {cfg.metric} {score:.4f}")
    shown = os.path.relpath(out)
    print(f"best config: {shown}   (run it: ./run.sh {shown})")
    return out
