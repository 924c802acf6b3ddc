"""Where a result came from: the pipeline's git commit and the digest of the config an experiment was claimed with
(bundles, model cards and Kaggle submission messages carry both)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from .layout import CONFIG_JSON, REPO


def git_commit() -> str:
    """HEAD of the checkout this package runs from, "+modified" when tracked files differ; "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("+modified" if dirty else "")


def config_digest(exp_dir: Path) -> str:
    """The first 12 hex digits of the SHA-256 of runs/<experiment>/config.json; "" before the experiment exists."""
    path = Path(exp_dir) / CONFIG_JSON
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else ""
