"""A fold's checkpoints on disk (the schema is core/layout.py's): saved after every epoch, in an order that a kill
anywhere leaves resumable, and the progress a killed fold resumes from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..core.files import atomic_path, write_csv
from ..core.layout import BEST, EPOCH_METRICS, LAST, last_checkpoint


def save_torch(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


@dataclass
class Progress:
    """What has been done in a fold: restored from last.pt after a kill."""

    epoch: int = 0  # epochs finished
    best: float | None = None  # best validation metric so far (of the model saved as best.pt)
    history: list[dict] = field(default_factory=list)
    phase: int = -1  # phase index of the last finished epoch
    optimizer: dict | None = None
    scheduler: dict | None = None


def read_last(out: Path) -> tuple[dict | None, Progress]:
    """out/last.pt's state (None without one) and where the fold stopped."""
    if not (out / LAST).is_file():
        return None, Progress()
    state = torch.load(out / LAST, map_location="cpu", weights_only=True)
    done = Progress(
        state["epoch"], state["best"], state["history"], state["phase"], state["optimizer"], state["scheduler"]
    )
    if (out / BEST).is_file() and checkpoint_epoch(out / BEST) > done.epoch:
        done.best = None  # killed between saving best.pt and last.pt: that epoch runs again and is saved again
    return state, done


def save_epoch(out: Path, model, optim, phase: int, done: Progress, best_state: dict | None) -> None:
    """best.pt first (when the epoch improved), then last.pt (with the optimiser, schedule and EMA of `optim`, a
    train.Optimiser), then metrics.csv: a kill between them is safe."""
    if best_state is not None:
        save_torch(best_state, out / BEST)
    last = last_checkpoint(
        model.state_dict(),
        optim.ema.state_dict() if optim.ema is not None else None,
        optim.opt.state_dict(),
        optim.sched.state_dict(),
        phase,
        done.epoch,
        done.best,
        done.history,
        optim.scaler.state_dict() if optim.scaler is not None else None,
    )
    save_torch(last, out / LAST)
    write_csv(pd.DataFrame(done.history), out / EPOCH_METRICS)
