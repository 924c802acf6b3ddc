"""Atomic file writes (a half-written file is never read as good), their clean-up after a kill, and locks."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .errors import PipelineError


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary name beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield str(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_folder(path: str | Path):
    """Yield an empty temporary folder beside `path`; if the block succeeds it takes the place of `path` (an older
    folder there is removed only then), else it is deleted."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            shutil.rmtree(old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_csv(df: pd.DataFrame, path: str | Path, float_format: str | None = None) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format=float_format)


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)")


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete temporaries (see atomic_path) under `folder` left by killed processes: their pid is gone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for tmp in folder.rglob(".*.tmp*"):
        m = TEMP_NAME.match(tmp.name)
        if m and tmp.is_file() and not _alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def exclusive(path: str | Path, what: str, wait: bool = False):
    """Hold an exclusive lock on `path` (released by the OS even on kill -9), or refuse clearly (wait: block until
    the holder is done instead, for short critical sections such as an append to the ledger)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise PipelineError(f"{what} is already running ({holder}); wait for it to finish or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
