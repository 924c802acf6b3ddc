"""The run's time budget (config `budget`): a session limit (Kaggle's 12 hours) met by stopping cleanly after an
epoch instead of being killed in the middle of one.

After every epoch (an epoch-end callback of the fold's trainer) the budget asks whether the next epoch still fits:
its phase's epoch time when one was measured, else the longest epoch of the model so far. If it does not fit, the
job stops there (its last.pt was saved before the callbacks ran) and no other job starts; the run then ends with one
line and exit code 75, and `resume_from` (or the same command, in the same folder) goes on. After the first epoch of
each phase of a model's first fold, the budget prints what the whole run should take, and warns when it will not
fit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import Config
from ..core.errors import OutOfTime
from ..core.layout import EPOCH_METRICS, TRAIN_DONE, fold_dir
from ..core.session import Kaggle, budget_seconds, duration_text
from .jobs import fold_todo


def epochs_done(out: Path, total: int) -> int:
    """Epochs a fold has finished: all once trained, else the rows of its metrics.csv (saved with last.pt)."""
    if (out / TRAIN_DONE).is_file():
        return total
    try:
        return max(0, len((out / EPOCH_METRICS).read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


@dataclass
class Budget:
    """The deadline, and the epochs left to train and what they have taken so far, per (model, phase)."""

    seconds: float | None  # None: no budget (estimates are still printed)
    start: float  # time.time() when the run started: shared with jobs in other processes
    jobs: int = 1  # jobs at once
    epochs_left: dict[tuple[str, int], int] = field(default_factory=dict)  # (model, phase) -> epochs, all its folds
    epoch_seconds: dict[tuple[str, int], float] = field(default_factory=dict)  # (model, phase) -> the latest epoch
    first_fold: dict[str, int] = field(default_factory=dict)  # a model's first fold to train: it prints estimates

    @classmethod
    def plan(cls, cfg: Config, session: Kaggle | None, jobs: list, exp_dir: Path, n: int, start: float) -> Budget:
        """The budget of a run started at `start` (time.time()) that trains `jobs` (model, fold), `n` at once, from
        what their folds hold."""
        budget = cls(budget_seconds(cfg.budget, session), start, n)
        for m, k in jobs:
            phases = [p.epochs for p in cfg.phases(m) if p.epochs > 0]
            done = epochs_done(fold_dir(exp_dir, m.name, k), sum(phases))
            first = 0  # the phase's first epoch, counted from 0
            for pi, epochs in enumerate(phases):
                left = max(0, min(epochs, first + epochs - done))
                budget.epochs_left[m.name, pi] = budget.epochs_left.get((m.name, pi), 0) + left
                first += epochs
            if done < sum(phases):
                budget.first_fold.setdefault(m.name, k)
        return budget

    @property
    def deadline(self) -> float:
        return self.start + self.seconds if self.seconds is not None else float("inf")

    def start_line(self, session: Kaggle | None) -> str | None:
        if self.seconds is None:
            return None
        where = " (a Kaggle session lasts 12h; budget=none turns this off)" if session else ""
        return f"budget: {duration_text(self.seconds)} from the run's start{where}"

    def epoch_guess(self, model: str, pi: int) -> float | None:
        """An epoch of the model's phase: measured, else the model's longest so far, else any model's."""
        mine = [s for (m, _), s in self.epoch_seconds.items() if m == model]
        return self.epoch_seconds.get((model, pi)) or max(mine or self.epoch_seconds.values() or [0]) or None

    def job_fits(self, model: str) -> bool:
        """Whether a job of `model` can start: its first epoch fits (unknown: yes)."""
        guess = self.epoch_guess(model, 0)
        return guess is None or time.time() + guess <= self.deadline

    def __call__(self, trainer, end) -> None:
        """The epoch-end callback: count the epoch, print the run's estimate when due, stop if the next won't fit."""
        job, pi = trainer.job, end.row["phase"] - 1
        name = job.model.name
        self.epoch_seconds[name, pi] = end.row["seconds"]
        self.epochs_left[name, pi] = max(0, self.epochs_left.get((name, pi), 1) - 1)
        phases = [p.epochs for p in trainer.phases]
        first_of_phase = end.epoch == sum(phases[:pi]) + 1
        if first_of_phase and job.fold == self.first_fold.get(name):
            print(self.estimate_line(name, pi))
        if end.epoch >= sum(phases):
            return  # the fold is trained: it predicts next
        next_pi = next(i for i in range(len(phases)) if end.epoch < sum(phases[: i + 1]))
        guess = self.epoch_guess(name, next_pi) or end.row["seconds"]
        if time.time() + guess > self.deadline:
            raise OutOfTime(f"{job.name} after epoch {end.epoch} of {sum(phases)}")

    def estimate(self) -> float:
        """Seconds the whole run should take: what has passed, plus every epoch left at its phase's measured time
        (else its model's longest, else any model's), shared among the jobs at once."""
        left = sum(n * (self.epoch_guess(m, pi) or 0) for (m, pi), n in self.epochs_left.items())
        return time.time() - self.start + left / self.jobs

    def estimate_line(self, model: str, pi: int) -> str:
        took = self.epoch_seconds[model, pi]
        total = self.estimate()
        line = (
            f"time: {model} phase {pi + 1}'s first epoch took {took:.0f}s; the run should take about "
            f"{duration_text(total)} in all (training; phases not yet seen counted at the model's longest epoch)"
        )
        if self.seconds is not None and total > self.seconds:
            line += (
                f"; warning: more than the budget of {duration_text(self.seconds)}: the run will stop there and "
                "resume_from continues it in a new session (or train fewer epochs, folds or models)"
            )
        return line


def _folds_text(jobs: list[tuple[str, int]]) -> str:
    """lite0 folds 0-2, lite1 fold 4: jobs grouped by model."""
    by_model: dict[str, list[int]] = {}
    for name, k in jobs:
        by_model.setdefault(name, []).append(k)
    return ", ".join(f"{m} fold{'s' if len(ks) > 1 else ''} {','.join(map(str, ks))}" for m, ks in by_model.items())


@dataclass
class Stops:
    """What the budget did to a run's jobs: the ones it stopped ((model, fold) -> where) and whether it held any
    back from starting."""

    stopped: dict[tuple[str, int], str] = field(default_factory=dict)
    held_back: bool = False

    def __bool__(self) -> bool:
        return bool(self.stopped) or self.held_back


def stop_if_stopped(budget: Budget, stage: str, exp_dir: Path, jobs: list[tuple[str, int]], stops: Stops) -> None:
    """After the jobs: if the budget stopped or held back any, raise OutOfTime with the line that says what is done
    (from the fold files), where each stopped job stopped and which never started."""
    if not stops:
        return
    stopped = stops.stopped
    done = [j for j in jobs if not fold_todo(stage, fold_dir(exp_dir, *j))]
    waiting = [j for j in jobs if j not in stopped and j not in done]
    parts = [f"done: {_folds_text(done) or 'none'}"]
    if stopped:
        parts.append(f"stopped: {'; '.join(stopped.values())}")
    if waiting:
        parts.append(f"not started: {_folds_text(waiting)}")
    raise OutOfTime(
        f"the budget of {duration_text(budget.seconds or 0)} is used up ({duration_text(time.time() - budget.start)} "
        f"since the start); {'; '.join(parts)}. To go on: run the same command here, or in a new session with "
        "resume_from=<this session's output folder> (on Kaggle: add this notebook's output as an input, "
        "/kaggle/input/<its name>)"
    )
