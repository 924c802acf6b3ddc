"""The training objective: the age loss of each age head (on the learnt age scale for regression, in years for the
others) plus the weighted gender BCE, and the age scale itself."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import TrainConfig
from ..models.network import above_thresholds

SMOOTH_L1_BETA = 0.25  # in standard deviations of the training ages (about 5 years on UTKFace)
DLDL_SIGMA = 2.0  # years: the spread of the label distribution around the true age (DLDL-v2)
MV_MEAN_WEIGHT, MV_VARIANCE_WEIGHT = 0.2, 0.05  # the mean-variance loss's lambda_1, lambda_2 (the paper's)


@dataclass(frozen=True)
class AgeScale:
    """Ages are learnt as (age - mean) / std (train.normalize_age), else in years (mean 0, std 1)."""

    mean: float
    std: float
    smooth_l1_beta: float  # on the learnt scale: SMOOTH_L1_BETA standard deviations of the training ages

    @classmethod
    def fit(cls, ages: np.ndarray, normalize: bool) -> AgeScale:
        spread = float(ages.std() + 1e-6)
        if normalize:
            return cls(float(ages.mean()), spread, SMOOTH_L1_BETA)
        return cls(0.0, 1.0, SMOOTH_L1_BETA * spread)

    def to_target(self, years: np.ndarray) -> np.ndarray:
        return ((years - self.mean) / self.std).astype(np.float32)


def age_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=beta)


def dldl_loss(logits: torch.Tensor, years: torch.Tensor, spread: float) -> torch.Tensor:
    """DLDL-v2: KL from a Gaussian around the true age (whole years 0..K-1) to the predicted distribution,
    plus the L1 error of its expectation in units of the training ages' spread."""
    ages = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
    target = torch.exp(-0.5 * ((ages[None] - years[:, None]) / DLDL_SIGMA) ** 2)
    target = target / target.sum(1, keepdim=True)
    log_p = F.log_softmax(logits.float(), dim=1)
    expectation = log_p.exp() @ ages
    return F.kl_div(log_p, target, reduction="batchmean") + F.l1_loss(expectation, years) / spread


def mean_variance_loss(logits: torch.Tensor, years: torch.Tensor) -> torch.Tensor:
    """Mean-variance loss (Pan et al., CVPR 2018): cross-entropy on the whole year, plus the squared error of the
    distribution's mean and its variance (both in years), weighted as in the paper."""
    ages = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    mean = p @ ages
    variance = (p * (ages[None] - mean[:, None]) ** 2).sum(1)
    ce = F.nll_loss(log_p, years.round().long().clamp(0, logits.shape[1] - 1))
    return ce + MV_MEAN_WEIGHT * 0.5 * ((mean - years) ** 2).mean() + MV_VARIANCE_WEIGHT * variance.mean()


def coral_loss(logits: torch.Tensor, years: torch.Tensor) -> torch.Tensor:
    """CORAL: binary cross-entropy of each threshold "age >= k" (k = 1..K), summed over thresholds as in the paper."""
    above = above_thresholds(years, logits.shape[1])
    return F.binary_cross_entropy_with_logits(logits.float(), above, reduction="none").sum(1).mean()


@dataclass(frozen=True)
class Objective:
    """The training loss: age loss + gender_weight x gender BCE. The age loss is train.age_loss on the learnt
    scale for a regression head; for the other heads their own loss (dldl_loss, mean_variance_loss, coral_loss), in
    years."""

    age_loss: str
    beta: float  # SmoothL1 beta on the learnt scale
    gender_weight: float
    spread: float = 1.0  # std of the training ages, in years (scales dldl's L1 term)
    age_head: str = "regression"
    gender_smoothing: float = 0.0

    @classmethod
    def of(cls, t: TrainConfig, scale: AgeScale, spread: float = 1.0, age_head: str = "regression") -> Objective:
        return cls(t.age_loss, scale.smooth_l1_beta, t.gender_weight, spread, age_head, t.gender_smoothing)

    def __call__(self, pred_age, gender_logit, y_age, y_gender) -> torch.Tensor:
        target = y_gender * (1 - self.gender_smoothing) + self.gender_smoothing / 2
        gender = F.binary_cross_entropy_with_logits(gender_logit.float(), target)
        if pred_age.ndim == 1:
            age = age_loss(self.age_loss, pred_age.float(), y_age, self.beta)
        elif self.age_head == "meanvar":  # a distribution or ordinal head's logits; y_age in years
            age = mean_variance_loss(pred_age, y_age)
        elif self.age_head == "coral":
            age = coral_loss(pred_age, y_age)
        else:
            age = dldl_loss(pred_age, y_age, self.spread)
        return age + self.gender_weight * gender

    @property
    def unsmoothed(self) -> Objective:
        """The objective against the true labels (validation: no label smoothing)."""
        return replace(self, gender_smoothing=0.0)


class LossSum:
    """The training objective (unsmoothed) over validation batches that come in row order: what val_loss reports,
    from the head's own outputs (a distribution or ordinal head's logits), so that it is the loss trained on."""

    def __init__(self, objective: Objective, target: np.ndarray, gender: np.ndarray):
        self.objective = objective.unsmoothed
        self.target, self.gender = torch.from_numpy(target), torch.from_numpy(np.asarray(gender, np.float32))
        self.total, self.seen = 0.0, 0

    def take(self, model, raw_age: torch.Tensor, logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the next rows' loss from a raw forward pass (the head's own outputs); returns (age, gender logit)
        as the plain forward pass gives them."""
        rows = slice(self.seen, self.seen + len(logit))
        y_age, y_gender = self.target[rows].to(logit.device), self.gender[rows].to(logit.device)
        self.total += float(self.objective(raw_age, logit, y_age, y_gender)) * len(logit)
        self.seen += len(logit)
        return (model.age_value(raw_age) if raw_age.ndim == 2 else raw_age), logit

    @property
    def value(self) -> float:
        return self.total / max(1, self.seen)
