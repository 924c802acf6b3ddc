"""Where the run is: a Kaggle notebook or anywhere else. The one home of what changes in a Kaggle session: where the
caches go (scratch, not the saved output), the output cap, and the default time budget.

A Kaggle notebook is recognised by KAGGLE_KERNEL_RUN_TYPE, which Kaggle sets in every notebook session
("Interactive" in the editor, "Batch" when the notebook is saved and run), together with its working folder
(<root>/working). The root is /kaggle; AGEGENDER_KAGGLE_ROOT points it elsewhere (the tests use a temporary folder).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError

KAGGLE_ROOT_VAR = "AGEGENDER_KAGGLE_ROOT"
KAGGLE_OUTPUT_LIMIT = 20e9  # bytes of /kaggle/working kept as the notebook's output
KAGGLE_SESSION = 12 * 3600  # seconds a Kaggle session lasts at most
KAGGLE_BUDGET = "11h30m"  # budget: auto on Kaggle: half an hour to spare for predicting, blending and saving
LOCAL_CACHE = "runs/cache"
DURATION = re.compile(r"(\d+(?:\.\d+)?)([hms])")
UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}


@dataclass(frozen=True)
class Kaggle:
    """A Kaggle notebook session's folders: working (saved as output, 20 GB), temp (scratch), input (read-only)."""

    root: Path

    @property
    def working(self) -> Path:
        return self.root / "working"

    @property
    def scratch(self) -> Path:
        return self.root / "temp"

    @property
    def cache(self) -> Path:
        return self.scratch / "agegender-cache"

    def saves(self, path: Path) -> bool:
        """Whether `path` lies in the saved output (/kaggle/working)."""
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(self.working))


def kaggle() -> Kaggle | None:
    """The Kaggle session this process runs in, or None elsewhere."""
    root = Path(os.environ.get(KAGGLE_ROOT_VAR) or "/kaggle")
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") and (root / "working").is_dir():
        return Kaggle(root)
    return None


def default_cache_dir() -> str:
    """data.cache_dir: auto: the Kaggle session's scratch disk, else runs/cache."""
    session = kaggle()
    return str(session.cache) if session else LOCAL_CACHE


def parse_duration(text: str) -> float:
    """Seconds of a duration such as 11h30m, 90m, 1.5h or 45s; PipelineError otherwise."""
    compact = text.replace(" ", "").lower()
    parts = DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact or len({u for _, u in parts}) < len(parts):
        raise PipelineError(f"budget={text!r}: write a duration such as 11h30m, 90m or 45s (or none, or auto)")
    return sum(float(n) * UNIT_SECONDS[u] for n, u in parts)


def valid_budget(text: str) -> bool:
    try:
        budget_seconds(text, session=None)
    except PipelineError:
        return False
    return True


def budget_seconds(text: str, session: Kaggle | None) -> float | None:
    """The run's time budget in seconds; None: no budget (auto outside Kaggle, or none)."""
    text = text.strip().lower()
    if text in ("none", "off", ""):
        return None
    if text == "auto":
        return parse_duration(KAGGLE_BUDGET) if session else None
    seconds = parse_duration(text)
    if seconds <= 0:
        raise PipelineError(f"budget={text!r}: a budget must be longer than 0")
    return seconds


def duration_text(seconds: float) -> str:
    """11h30m, 25m, 40s: how budgets and estimates are printed."""
    seconds = max(0, round(seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"
