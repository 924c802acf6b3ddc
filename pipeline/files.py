"""Atomic file writes: a half-written file is never read as good."""

from __future__ import annotations

import fcntl
import os
import re
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


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def save_torch(obj, path: str | Path) -> None:
    import torch  # here, so that torch-free users of this module (an ONNX bundle) do not load it

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
def exclusive(path: str | Path, what: str):
    """Hold an exclusive lock on `path` (released by the OS even on kill -9), or refuse clearly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
