"""launcher=local with local.jobs > 1: (model, fold) jobs side by side, each in its own spawned process pinned to one
GPU (Kaggle's T4 x2 trains two folds at once), the CPU cores shared out among them by core.cores.

Processes are spawned, not forked: a notebook may have initialised CUDA already, and a forked child cannot use it.
A child gets its GPU (CUDA_VISIBLE_DEVICES) and its share of the cores (OMP_NUM_THREADS, torch threads) before
it touches torch, runs the job exactly as launcher=local does in its own process, and sends back how it ended. A
job that fails or dies is reported in one line, as under launcher=ray; the other jobs finish and keep their results.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from ..core.config import Config, ModelConfig
from ..core.cores import cores_per_job, usable_cores
from ..core.errors import OutOfTime, PipelineError
from ..core.files import remove_stale_temporaries, write_text
from ..core.layout import error_log, fold_dir
from ..data.competition import Competition
from ..training.job import uses_cuda
from ..training.pseudo import stage_pseudo_labels
from .budget import Budget, Stops
from .jobs import CANCEL_GRACE_S, failed_jobs_error, first_line, model_images, pseudo_label_waves, run_fold

ORPHAN_CHECK_S = 2  # how often a job checks that its run is still alive


@dataclass
class Child:
    """One job's process as the parent sees it."""

    model: ModelConfig
    fold: int
    slot: int  # which GPU (or share of the cores) it holds
    process: multiprocessing.process.BaseProcess
    results: Connection
    started: float

    @property
    def name(self) -> str:
        return f"{self.model.name} fold {self.fold}"


@dataclass
class ChildSpec:
    stage: str
    cfg: Config
    model: ModelConfig
    fold: int
    comp: Competition  # as loaded: the child's model_images finds the parent's image cache
    folds: pd.DataFrame
    exp_dir: Path
    cwd: str
    gpu: int | None
    threads: int
    budget: Budget
    parent: int  # the run's process: the job stops when it is gone


def child_main(spec: ChildSpec, results: Connection) -> None:
    """A job's process: its GPU and cores first, then the job; how it ended goes back through `results`."""
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(spec.gpu)
    os.environ["OMP_NUM_THREADS"] = str(spec.threads)
    torch.set_num_threads(spec.threads)
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: a killed job would leak its semaphore
    threading.Thread(target=_stop_when_orphaned, args=(spec.parent,), daemon=True).start()
    os.chdir(spec.cwd)
    cfg, m, k = spec.cfg, spec.model, spec.fold
    try:
        comp, images = model_images(spec.comp, cfg, m)
        out = fold_dir(spec.exp_dir, m.name, k)
        run_fold(spec.stage, cfg, m, k, comp, images, spec.folds, out, spec.exp_dir, callbacks=[spec.budget])
        results.send(("done", ""))
    except OutOfTime as e:
        results.send(("stopped", str(e)))
    except PipelineError as e:
        results.send(("error", str(e)))
    except KeyboardInterrupt:
        results.send(("error", "interrupted"))
    except BaseException as e:  # a bug: its traceback is kept in a file
        log = error_log(spec.exp_dir, f"{m.name}-fold{k}")
        write_text("".join(traceback.format_exception(e)), log)
        results.send(("error", f"{type(e).__name__}: {first_line(e)} (traceback in {log})"))
    finally:
        results.close()


def _stop_when_orphaned(parent: int) -> None:
    """A job whose run was killed (kill -9, a restarted notebook kernel) stops too, as a job in the run's own process
    would: it must not hold its fold's lock or its GPU. A rerun resumes it from its last epoch."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(1)


def job_slots(cfg: Config) -> list[int | None]:
    """One entry per job that runs at once: the GPU it is pinned to (its CUDA_VISIBLE_DEVICES entry), or None on
    CPU. local.jobs above the visible GPUs (or, on CPU, the usable cores) is refused in one line."""
    gpus = torch.cuda.device_count() if uses_cuda(cfg) else 0
    n = (gpus or 1) if cfg.local.jobs == "auto" else int(cfg.local.jobs)
    if gpus and n > gpus:
        raise PipelineError(
            f"local.jobs={n}: {gpus} GPU(s) are visible here and each job needs its own; use local.jobs=auto "
            f"(one per GPU) or at most {gpus}"
        )
    cores = usable_cores()
    if not gpus and n > cores:
        raise PipelineError(
            f"local.jobs={n}: this machine has {cores} usable CPU core(s) and each job needs one; use "
            f"local.jobs={cores} or fewer"
        )
    if not gpus:
        return [None] * n
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    return [int(visible[i]) if len(visible) > i and visible[i].strip().isdigit() else i for i in range(n)]


def died(child: Child) -> str:
    """Why a job's process ended without saying how."""
    code = child.process.exitcode
    if code is not None and code < 0:
        sig = signal.Signals(-code).name
        hint = " (the system kills the largest process when memory runs out: lower train.batch_size or local.jobs)"
        return f"its process was killed by {sig}{hint if sig == 'SIGKILL' else ''}"
    return f"its process died (exit code {code})"


def run_parallel(stage: str, cfg: Config, jobs: list[tuple[ModelConfig, int]], run: RunSpec) -> Stops:
    """Run `jobs` (model, fold) at most run.slots at once, wave by wave (a student waits for its teacher).
    Returns what the budget did; a failed job raises (after every other job has finished) in one line."""
    failed: list[str] = []
    stops = Stops()
    for wave in pseudo_label_waves(cfg, jobs):
        if stops:
            stops.held_back = True
            break
        if stage != "predict":
            for m, k in wave:
                stage_pseudo_labels(run.exp_dir, m, k)
        _run_wave(stage, cfg, wave, run, failed, stops)
    if failed:
        raise failed_jobs_error(failed)
    return stops


@dataclass
class RunSpec:
    """What every child of a run shares: the data, where it runs, the GPUs or core shares, the budget."""

    comp: Competition
    folds: pd.DataFrame
    exp_dir: Path
    gpus: list[int | None]  # one entry per slot: a GPU index, or None on CPU
    budget: Budget

    @property
    def threads(self) -> int:
        return cores_per_job(len(self.gpus))


def _run_wave(stage: str, cfg: Config, wave: list, run: RunSpec, failed: list[str], stops: Stops) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue, running, free = list(wave), [], list(range(len(run.gpus)))
    try:
        while queue or running:
            while queue and free and not stops:
                m, k = queue.pop(0)
                if stage != "predict" and not run.budget.job_fits(m.name):
                    stops.held_back = True
                    break
                running.append(_start(ctx, stage, cfg, m, k, run, free.pop(0)))
            if stops and queue:
                stops.held_back = True
                queue.clear()
            if not running:
                break
            ready = wait([c.process.sentinel for c in running])
            for child in [c for c in running if c.process.sentinel in ready]:
                running.remove(child)
                free.append(child.slot)
                _finished(child, failed, stops, run)
    except KeyboardInterrupt:
        _cancel(running, run.exp_dir)
        raise


def _start(ctx, stage: str, cfg: Config, m: ModelConfig, k: int, run: RunSpec, slot: int) -> Child:
    receive, send = ctx.Pipe(duplex=False)
    spec = ChildSpec(
        stage,
        cfg,
        m,
        k,
        run.comp,
        run.folds,
        run.exp_dir,
        os.getcwd(),
        run.gpus[slot],
        run.threads,
        run.budget,
        os.getpid(),
    )
    process = ctx.Process(target=child_main, args=(spec, send), name=f"{m.name}-fold{k}", daemon=False)
    process.start()
    send.close()  # the child holds the sending end: the parent sees EOF if it dies
    where = f"GPU {run.gpus[slot]}" if run.gpus[slot] is not None else f"{run.threads} CPU thread(s)"
    print(f"{m.name} fold {k}: started in process {process.pid} on {where}")
    return Child(m, k, slot, process, receive, time.perf_counter())


def _finished(child: Child, failed: list[str], stops: Stops, run: RunSpec) -> None:
    child.process.join()
    try:
        kind, message = child.results.recv() if child.results.poll() else ("error", died(child))
    except (EOFError, OSError):
        kind, message = "error", died(child)
    child.results.close()
    seconds = time.perf_counter() - child.started
    if kind == "done":
        print(f"{child.name}: done in {seconds:.0f}s")
    elif kind == "stopped":
        stops.stopped[child.model.name, child.fold] = message
        print(f"{child.name}: {message} (budget)")
    else:
        remove_stale_temporaries(fold_dir(run.exp_dir, child.model.name, child.fold))
        print(f"error: {child.name}: {message}", file=sys.stderr)
        failed.append(f"{child.model.name}-fold{child.fold}")


def _cancel(running: list[Child], exp_dir: Path) -> None:
    """Ctrl-C: each job is interrupted like a Ctrl-C in its own process (it removes its temporaries); one that has
    not stopped after a grace period is killed, and what it was writing is cleared."""
    for child in running:
        if child.process.is_alive():
            os.kill(child.process.pid, signal.SIGINT)
    end = time.monotonic() + CANCEL_GRACE_S
    for child in running:
        child.process.join(max(0.0, end - time.monotonic()))
        if child.process.is_alive():
            child.process.kill()
            child.process.join()
        remove_stale_temporaries(fold_dir(exp_dir, child.model.name, child.fold))
