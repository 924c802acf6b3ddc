"""One (model, fold) job: what the train and predict stages need to know about it, and how its model is run to
predict (Inference)."""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
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
from ..models.gpu import check_gpu
from .loader import auto_workers


def uses_cuda(cfg: Config) -> bool:
    """Whether train.device puts training and predicting on the GPU (auto: when torch sees one)."""
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def check_device(cfg: Config) -> None:
    """A GPU the installed torch has no kernels for (e.g. a P100 under torch 2.8+) is refused in one line, before
    anything is written; nothing to do on CPU-only machines."""
    if uses_cuda(cfg):
        check_gpu("cuda", cpu_instead="train.device=cpu")


def pick_device(cfg: Config) -> torch.device:
    """The training device; on CUDA with TF32 matmuls and convolutions, and cuDNN picking the fastest kernels
    (the batch shapes repeat; the GPU path is not bit-reproducible anyway). A GPU torch cannot run is refused."""
    if uses_cuda(cfg):
        check_device(cfg)  # again here: a Ray worker or Tune trial may sit on another machine's GPU
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def check_compile(cfg: Config) -> None:
    """train.compile needs a C++ compiler (torch.compile's inductor builds its CPU kernels and CUDA launchers)."""
    compilers = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    if cfg.train.compile and not any(c and shutil.which(c) for c in compilers):
        raise PipelineError(
            "train.compile: true needs a C++ compiler for torch.compile and none was found (g++, clang++, c++ or "
            "$CXX): install one (apt-get install g++) or set train.compile: false"
        )


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


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast precision of train.amp on `device` (None: fp32). auto: bf16 where the GPU computes it natively
    (Ampere and later), fp16 with a gradient scaler on older ones (Kaggle's T4, which only emulates bf16), fp32 on
    CPU."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, precision: torch.dtype | None):
    """The autocast context of `precision` (amp_dtype) on `device`; None: plain fp32."""
    return nullcontext() if precision is None else torch.autocast(device.type, dtype=precision)


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
    amp: str | None = None  # instead of train.amp ("bf16" / "fp16" on CPU exercise the CUDA path's precision)

    @property
    def precision(self) -> torch.dtype | None:
        """The autocast dtype this job trains and predicts in (None: fp32)."""
        return amp_dtype(self.amp or self.cfg.train.amp, self.device)

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
    precision: torch.dtype | None  # the autocast dtype (FoldJob.precision); None: fp32
    workers: int
    tta: tuple[str, ...] = ("none",)

    @classmethod
    def for_job(cls, job: FoldJob, tta: list[str] | None = None) -> Inference:
        return cls(
            device=job.device,
            batch_size=job.cfg.batch_size(job.model) * 2,  # no gradients: twice the training batch fits
            precision=job.precision,
            workers=auto_workers(job.cfg.train.num_workers),
            tta=tuple(tta or ["none"]),
        )
