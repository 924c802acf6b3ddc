"""The body of one (model, fold) job, the same wherever it runs: in this process, on a Ray worker, in a Tune trial."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from ..core.config import Config, ModelConfig
from ..core.errors import PipelineError
from ..core.files import exclusive
from ..core.layout import LAST, PREDICT_DONE, TRAIN_DONE, fold_lock
from ..core.tracking import Tracker
from ..data.cache import Images, prepare_images
from ..data.competition import Competition
from ..inference.predict import predict_fold
from ..training.job import FoldJob, pick_device
from ..training.train import EpochCallback, train_fold

CANCEL_GRACE_S = 10  # Ctrl-C: how long jobs (Ray tasks, local.jobs' processes) get to stop before they are killed


def worker_threads(cfg: Config) -> None:
    """A job on a Ray worker uses ray.cpus_per_job torch threads (CPU results depend on the thread count), and no more
    cores than that for anything else (core.cores.usable_cores reads OMP_NUM_THREADS)."""
    torch.set_num_threads(cfg.ray.cpus_per_job)
    os.environ["OMP_NUM_THREADS"] = str(cfg.ray.cpus_per_job)  # this job's own process


def model_images(loaded: Competition, cfg: Config, m: ModelConfig) -> tuple[Competition, Images]:
    """The per-model image step of every launcher (local, the Ray driver and its workers, a Tune trial): the model's
    images at its size, always from the competition as loaded, so that models of one size share one image list and
    so one cache. Returns the competition without its unreadable training rows (the rows the images align with)."""
    return prepare_images(loaded, cfg, cfg.img_size(m))


def fold_started(out: Path) -> bool:
    """Whether the fold in `out` has begun training (it resumes from its own checkpoint, not the starting weights)."""
    return (out / TRAIN_DONE).is_file() or (out / LAST).is_file()


def fold_todo(stage: str, out: Path) -> bool:
    """Whether the stage has anything left to do for the fold in `out`."""
    return (stage != "predict" and not (out / TRAIN_DONE).is_file()) or (
        stage != "train" and not (out / PREDICT_DONE).is_file()
    )


def run_fold(
    stage: str,
    cfg: Config,
    m: ModelConfig,
    k: int,
    comp: Competition,
    images: Images,
    folds: pd.DataFrame,
    out: Path,
    exp_dir: Path,
    tracker: Tracker | None = None,
    callbacks: Sequence[EpochCallback] = (),
) -> None:
    """One (model, fold) job: train and/or predict, under the fold's lock, with its own tracking run (default: a
    W&B run named <model>-fold<k>, idle when there is nothing left to do); `callbacks` join training's epoch ends."""
    todo = fold_todo(stage, out)
    with exclusive(fold_lock(out), f"{cfg.experiment}/{m.name} fold {k}"):
        tracker = tracker or Tracker(cfg, f"{m.name}-fold{k}", stage, exp_dir, enabled=todo)
        job = FoldJob(cfg, m, k, comp, images, folds, out, pick_device(cfg), tracker)
        if stage in ("train", "run"):
            train_fold(job, callbacks)
        if stage in ("predict", "run"):
            predict_fold(job)
        tracker.finish()


def pseudo_label_waves(cfg: Config, jobs: list) -> list[list]:
    """Jobs in waves: models without pseudo-labels first, then each student after its teacher's wave."""
    level: dict[str, int] = {}
    for m in cfg.models:  # a teacher is always listed before its students (config check)
        level[m.name] = level[m.pseudo_labels] + 1 if m.pseudo_labels else 0
    waves = [[(m, k) for m, k in jobs if level[m.name] == n] for n in range(max(level.values()) + 1)]
    return [w for w in waves if w]


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): a failed job's one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def failed_jobs_error(failed: list[str]) -> PipelineError:
    """The one line of a run whose jobs (named model-fold<k>) failed while the others finished (ray, local.jobs)."""
    return PipelineError(
        f"{len(failed)} job(s) failed ({', '.join(failed)}); finished folds are kept and a rerun skips them"
    )
