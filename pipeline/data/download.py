"""data.competition: a Kaggle competition's files, downloaded into data.root by the official client when that folder
is missing or empty. The archive is unpacked beside the folder and renamed onto it only when complete, so a killed
download never leaves a half folder that looks ready."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..core.config import DataConfig
from ..core.files import exclusive
from ..core.kaggle_api import call, kaggle_api


def needs_download(d: DataConfig) -> bool:
    root = Path(d.root)
    return bool(d.competition) and (not root.exists() or (root.is_dir() and not any(root.iterdir())))


def download_competition(d: DataConfig) -> Path:
    """Download and unzip data.competition into data.root (see needs_download); returns the folder."""
    root = Path(d.root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(root.with_name(f".{root.name}.download.lock"), f"the download into {root}", wait=True):
        if needs_download(d):  # another process may have finished it while this one waited
            _download(d, root)
    return root


def _download(d: DataConfig, root: Path) -> None:
    part = root.with_name(f".{root.name}.download")
    print(f"downloading the files of Kaggle competition {d.competition} into {root} ...", flush=True)
    api = kaggle_api()
    shutil.rmtree(part, ignore_errors=True)  # an earlier download that was stopped starts again
    part.mkdir(parents=True)
    try:
        call(
            f"download of competition {d.competition}",
            lambda: api.competition_download_files(d.competition, path=str(part), quiet=False, unzip=True),
        )
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    files = sum(len(f) for _, _, f in os.walk(part))
    if root.exists():
        root.rmdir()  # empty, as needs_download checked
    os.replace(part, root)
    print(f"{d.competition}: {files} files in {root}")
