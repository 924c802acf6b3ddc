"""One (model, fold) job: what the train and predict stages need to know about it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import Config, ModelConfig
from .data import Competition, Images
from .errors import PipelineError
from .tracking import Tracker


def pick_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def fold_rows(comp: Competition, folds: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in comp.train of fold `fold`'s training rows and of its validation (out-of-fold) rows."""
    fold_of = dict(zip(folds.id, folds.fold))
    f = np.array([fold_of.get(i, -1) for i in comp.train.id])
    train, val = np.flatnonzero((f != fold) & (f >= 0)), np.flatnonzero(f == fold)
    if len(val) == 0 or len(train) == 0:
        raise PipelineError(
            f"fold {fold} has {len(train)} training and {len(val)} validation images left "
            "(unreadable images skipped?); use fewer folds or fix the images"
        )
    return train, val


@dataclass
class FoldJob:
    cfg: Config
    model: ModelConfig
    fold: int
    comp: Competition
    images: Images  # train and test images at this model's size, rows aligned with comp
    folds: pd.DataFrame
    out: Path  # runs/<experiment>/<model>/fold<k>
    device: torch.device
    tracker: Tracker
    amp: bool | None = None  # bf16 autocast; None: on CUDA when train.amp (True on CPU exercises that path)

    @property
    def autocast(self) -> bool:
        return self.amp if self.amp is not None else self.device.type == "cuda" and self.cfg.train.amp

    @property
    def name(self) -> str:
        return f"{self.model.name} fold {self.fold}"

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        return fold_rows(self.comp, self.folds, self.fold)
