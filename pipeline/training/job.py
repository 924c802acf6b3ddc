"""One (model, fold) job: what the train and predict stages need to know about it, and how its model is run to
predict (Inference)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.config import Config, ModelConfig
from ..core.errors import PipelineError
from ..core.tracking import Tracker
from ..data.cache import Images
from ..data.competition import Competition
from .loader import auto_workers


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


@dataclass(frozen=True)
class Inference:
    """How a model is run to predict: the same for per-epoch validation and for the predict stage."""

    device: torch.device
    batch_size: int
    amp: bool  # bf16 autocast (FoldJob.autocast)
    workers: int
    tta: tuple[str, ...] = ("none",)

    @classmethod
    def for_job(cls, job: FoldJob, tta: list[str] | None = None) -> Inference:
        return cls(
            device=job.device,
            batch_size=job.cfg.batch_size(job.model) * 2,  # no gradients: twice the training batch fits
            amp=job.autocast,
            workers=auto_workers(job.cfg.train.num_workers),
            tta=tuple(tta or ["none"]),
        )
