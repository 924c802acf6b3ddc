"""launcher=ray: every (model, fold) job is one Ray task, on this machine or on a running Ray cluster.

The driver prepares the data (the image cache, the folds), submits the jobs, prints one line per finished job and
blends once every job is in. A job trains its fold then writes its TTA predictions, exactly as with
launcher=local. With a shared filesystem the job writes under runs/ itself; with ray.shared_fs=false it works in
a scratch folder on its node and returns the fold's files, which the driver writes atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ..core.config import Config, ModelConfig
from ..core.cores import usable_cores
from ..core.errors import PipelineError
from ..core.files import remove_stale_temporaries, write_bytes, write_text
from ..core.layout import DONE_MARKERS, LAST, PREDICT_DONE, REPO, PredictDone, error_log, experiment_dir, fold_dir
from ..data.competition import Competition
from ..training.checkpoint import checkpoint_epoch
from ..training.pseudo import stage_pseudo_labels
from .jobs import (
    CANCEL_GRACE_S,
    failed_jobs_error,
    first_line,
    fold_todo,
    model_images,
    pseudo_label_waves,
    run_fold,
    worker_threads,
)

SCRATCH = Path(tempfile.gettempdir()) / "pipeline-ray"
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: a request through it fails at once, on loopback
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
# Ray on this machine only: node addresses stay 127.0.0.1 (Ray otherwise swaps in the external address and
# binds its servers to every interface), no usage statistics, and the usage reporter's "disabled" ping and
# cloud-metadata probes go nowhere. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is read when ray is first imported.
LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_REPORT_URL": DEAD_PROXY,
}


def is_local_address(address: str) -> bool:
    """'' (start Ray here) or a loopback HOST:PORT: the cluster lives on this machine only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return address == "" or host in ("localhost", "::1") or host.startswith("127.")


def import_ray(address: str):
    """Import ray, first making a local cluster loopback-only (the settings must precede the import)."""
    if is_local_address(address):
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            raise PipelineError("ray was imported before the loopback-only settings could be applied")
        os.environ.update(LOCAL_RAY_ENV)
    try:
        import ray
    except ImportError:
        raise PipelineError("launcher=ray needs the ray package: pip install -r requirements.txt") from None
    return ray


@contextmanager
def system_processes_env():
    """While Ray starts its own processes here: HTTP(S) proxies pointed at a dead loopback port, so that Ray's
    cloud-metadata probes and usage ping cannot leave the machine. Jobs get the caller's proxies back
    (worker_env)."""
    saved = {k: os.environ.get(k) for k in PROXY_VARS + ("NO_PROXY", "no_proxy")}
    os.environ.update({k: DEAD_PROXY for k in PROXY_VARS})
    os.environ.update({"NO_PROXY": "", "no_proxy": ""})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_env() -> dict[str, str]:
    """Environment of the job processes: this package importable, the caller's own proxies (or none)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}  # no PyPI ping
    env.update({k: os.environ.get(k, "") for k in PROXY_VARS + ("NO_PROXY", "no_proxy")})
    return env


def check_reachable(address: str) -> None:
    """A HOST:PORT nobody listens on would keep ray.init retrying for minutes: refuse it in seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f'ray.address={address!r}: use "" (start Ray here), auto, or HOST:PORT of the head node')
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise PipelineError(
            f"ray.address={address!r}: no Ray head node answers there ({e.strerror or e}); start one with "
            "`ray start --head` or fix the address"
        ) from None


def connect(cfg: Config):
    """Start Ray on this machine (ray.address "") or join the cluster at ray.address; returns the ray module."""
    address = cfg.ray.address
    if address not in ("", "auto"):
        check_reachable(address)
    ray = import_ray(address)
    if ray.is_initialized():
        return ray
    kwargs = dict(runtime_env={"env_vars": worker_env()}, log_to_driver=True, logging_level="WARNING")
    try:
        if address == "":
            with system_processes_env():
                ray.init(
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    num_cpus=usable_cores(),
                    # a job Ray's memory monitor kills is retried like a lost worker, not forever (Ray's default)
                    _system_config={"task_oom_retries": cfg.ray.max_retries},
                    **kwargs,
                )
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise PipelineError(f"ray.address={address!r}: cannot join a Ray cluster there ({first_line(e)})") from None
    return ray


def job_resources(ray, cfg: Config) -> tuple[int, float]:
    """(CPUs, GPUs) a job asks for; refused when no node of the cluster could ever run it (it would wait forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = cfg.ray.gpus_per_job
    if gpus < 0:
        gpus = 1.0 if any(n.get("GPU", 0) > 0 for n in nodes) else 0.0
    cpus = cfg.ray.cpus_per_job
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        largest = max((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes) if nodes else (0, 0)
        raise PipelineError(
            f"ray: no node of the cluster has ray.cpus_per_job={cpus} CPUs and ray.gpus_per_job={gpus:g} GPUs "
            f"(largest node: {largest[0]:g} CPUs, {largest[1]:g} GPUs); lower them"
        )
    return cpus, gpus


@dataclass
class JobSpec:
    """Everything a (model, fold) task needs; the images are read (or decoded) on the worker."""

    stage: str
    cfg: Config
    model: ModelConfig
    fold: int
    cwd: str  # the driver's working folder: runs/, folds/, relative data paths
    files: dict[str, bytes] = field(default_factory=dict)  # shared_fs=false: the fold's files the driver has


@dataclass
class JobResult:
    node: str
    seconds: float
    resumed_after: int  # epochs a retry found already done in last.pt (0 = a fresh start)
    oof: dict | None  # predict_done.json's OOF figures
    files: dict[str, bytes]  # shared_fs=false: the fold's files, for the driver to write


def job_dir(cfg: Config, m: ModelConfig, k: int) -> Path:
    """The job's fold folder on the driver (and on every node with a shared file system)."""
    return fold_dir(experiment_dir(cfg.experiment), m.name, k)


def scratch_dir(cfg: Config, m: ModelConfig, k: int) -> Path:
    """shared_fs=false: the job's own folder on its node, keyed by the config (a retry there resumes)."""
    key = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return fold_dir(SCRATCH / f"{cfg.experiment}-{key}", m.name, k)


def last_epoch(out: Path) -> int:
    return checkpoint_epoch(out / LAST) if (out / LAST).is_file() else 0


def fold_task(spec: JobSpec, comp: Competition, folds: pd.DataFrame) -> JobResult:
    """One (model, fold) job on a Ray worker: the same code path as launcher=local. `comp` is the competition as
    loaded, which the driver's model_images started from too, so the worker finds the same image cache (or builds its
    own copy)."""
    t0 = time.perf_counter()
    worker_threads(spec.cfg)
    if not os.path.isdir(spec.cwd):
        raise PipelineError(
            f"{spec.cwd} does not exist on node {node_name()}: the project, its venv and the data must be at "
            "the same path on every node"
        )
    os.chdir(spec.cwd)
    cfg, m, k = spec.cfg, spec.model, spec.fold
    out, exp_dir = job_dir(cfg, m, k), experiment_dir(cfg.experiment)
    if not cfg.ray.shared_fs:
        out, exp_dir = scratch_dir(cfg, m, k), scratch_dir(cfg, m, k).parents[1]
        for name, data in spec.files.items():
            if not (out / name).is_file():
                write_bytes(data, out / name)
    resumed = last_epoch(out)
    comp, images = model_images(comp, cfg, m)
    run_fold(spec.stage, cfg, m, k, comp, images, folds, out, exp_dir)
    oof = PredictDone.read(out).oof if (out / PREDICT_DONE).is_file() else None
    files = {} if cfg.ray.shared_fs else fold_files(out)
    if not cfg.ray.shared_fs:
        shutil.rmtree(out, ignore_errors=True)
    return JobResult(node_name(), time.perf_counter() - t0, resumed, oof, files)


def node_name() -> str:
    """This worker's node: address and the start of its Ray node id (several nodes may share an address)."""
    import ray

    ctx = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"


def fold_files(out: Path) -> dict[str, bytes]:
    """A finished fold's outputs (not last.pt, which only matters mid-fold; not temporaries or locks)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


def write_fold_files(out: Path, files: dict[str, bytes]) -> None:
    """Each file atomically; the done markers last, so an interrupted write leaves the fold unfinished."""
    for name in sorted(files, key=lambda n: n in DONE_MARKERS):
        write_bytes(files[name], out / name)


def job_error(e: BaseException, ray, max_retries: int) -> tuple[str, bool]:
    """(one-line message, whether it is a bug whose traceback is worth keeping) of a failed job."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, PipelineError):
        return str(cause), False
    if isinstance(e, ray.exceptions.OutOfMemoryError):
        return "killed by Ray for lack of memory; lower train.batch_size or raise ray.cpus_per_job", False
    if isinstance(e, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return f"its worker or node died {max_retries + 1} times (ray.max_retries={max_retries})", False
    if isinstance(e, ray.exceptions.TaskCancelledError):
        return "cancelled", False
    if cause is not None:
        return f"{type(cause).__name__}: {first_line(cause)}", True
    return f"{type(e).__name__}: {first_line(e)}", True


def submit(ray, stage: str, cfg: Config, jobs: list[tuple[ModelConfig, int]], comp: Competition, folds) -> dict:
    """One task per job, each given the competition as loaded; returns {ObjectRef: (model, fold)}."""
    cpus, gpus = job_resources(ray, cfg)
    task = ray.remote(fold_task)
    comp_ref = ray.put(comp)
    folds_ref = ray.put(folds)
    refs = {}
    for m, k in jobs:
        files = {} if cfg.ray.shared_fs else existing_files(job_dir(cfg, m, k))
        spec = JobSpec(stage, cfg, m, k, os.getcwd(), files)
        ref = task.options(
            num_cpus=cpus, num_gpus=gpus, max_retries=cfg.ray.max_retries, retry_exceptions=False, name=job_name(m, k)
        ).remote(spec, comp_ref, folds_ref)
        refs[ref] = (m, k)
    return refs


def job_name(m: ModelConfig, k: int) -> str:
    return f"{m.name}-fold{k}"


def existing_files(out: Path) -> dict[str, bytes]:
    return fold_files(out) if out.is_dir() else {}


def run_on_ray(stage: str, cfg: Config, models: list, folds_to_run: list[int], comp, folds, exp_dir: Path):
    """Run every unfinished (model, fold) job on Ray; returns the competition the blend uses (as local does)."""
    used = comp
    for m in models:  # the driver builds each model's image cache once; shared-fs workers just read it
        used, _ = model_images(comp, cfg, m)
    jobs = [(m, k) for m in models for k in folds_to_run if fold_todo(stage, fold_dir(exp_dir, m.name, k))]
    if not jobs:
        print("ray: every job is already done")
        return used
    ray = connect(cfg)
    started_here = cfg.ray.address == ""
    try:
        for wave in pseudo_label_waves(cfg, jobs):  # a student's jobs wait for its teacher's predictions
            if stage != "predict":
                for m, k in wave:
                    stage_pseudo_labels(exp_dir, m, k)
            collect(ray, cfg, submit(ray, stage, cfg, wave, comp, folds), exp_dir)
    finally:
        if started_here:
            ray.shutdown()
    return used


def collect(ray, cfg: Config, refs: dict, exp_dir: Path) -> None:
    """Wait for every job: one line per finished one, a bar over all; Ctrl-C cancels what is still running."""
    failed, total = [], len(refs)
    bar = tqdm(total=total, desc="jobs", unit="job", disable=None)
    t0 = time.perf_counter()
    try:
        while refs:
            (ref,), _ = ray.wait(list(refs), num_returns=1)
            m, k = refs.pop(ref)
            bar.update()
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                failed.append(report_failure(e, ray, cfg, m, k, exp_dir))
                continue
            if not cfg.ray.shared_fs:
                write_fold_files(job_dir(cfg, m, k), result.files)
            tqdm.write(progress_line(cfg, m, k, result))
    except KeyboardInterrupt:
        cancel(ray, cfg, refs)
        raise
    finally:
        bar.close()
    print(f"ray: {total - len(failed)} of {total} jobs finished in {time.perf_counter() - t0:.0f}s")
    if failed:
        raise failed_jobs_error(failed)


def cancel(ray, cfg: Config, refs: dict) -> None:
    """Ctrl-C: a plain cancel interrupts each job like Ctrl-C, so it removes its half-written temporaries on the way
    out; a job that has not stopped after a grace period is killed (a rerun clears what it left)."""
    for ref in refs:
        ray.cancel(ref)
    _, running = ray.wait(list(refs), num_returns=len(refs), timeout=CANCEL_GRACE_S)
    for ref in running:
        ray.cancel(ref, force=True)
    if running:
        ray.wait(running, num_returns=len(running), timeout=CANCEL_GRACE_S)
    if cfg.ray.shared_fs:  # what the killed jobs were writing when they died
        for m, k in refs.values():
            remove_stale_temporaries(job_dir(cfg, m, k))


def report_failure(e, ray, cfg: Config, m: ModelConfig, k: int, exp_dir: Path) -> str:
    """Print the job's one-line error (a bug's traceback goes to a file); returns the job's name."""
    message, is_bug = job_error(e, ray, cfg.ray.max_retries)
    if is_bug:
        log = error_log(exp_dir, job_name(m, k))
        write_text("".join(traceback.format_exception(e)), log)
        message += f" (traceback in {log})"
    tqdm.write(f"error: {m.name} fold {k}: {message}", file=sys.stderr)
    return job_name(m, k)


def progress_line(cfg: Config, m: ModelConfig, k: int, r: JobResult) -> str:
    oof = f", OOF {cfg.metric} {r.oof[cfg.metric]:.4f}" if r.oof else ""
    retried = f" (retried: resumed after epoch {r.resumed_after})" if r.resumed_after else ""
    return f"{m.name} fold {k}: done on node {r.node} in {r.seconds:.1f}s{oof}{retried}"
