"""Predictions of a model on cached images, averaged over TTA views: per-epoch validation (training) and the
predict stage's OOF and test predictions (inference) run the same code. The model runs in eval mode; every module's
train/eval mode is restored afterwards (frozen stages stay in eval mode)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..models.network import AgeGenderNet
from ..models.stages import evaluating
from ..models.tta import apply_tta
from .job import Inference, autocast
from .loader import FaceDataset, LoaderSettings, make_loader, to_model_input
from .losses import AgeScale, LossSum, Objective
from .trunk import CachedTrunk, StoredViews


@dataclass(frozen=True)
class AgeUnits:
    """A model's age output in years: output * std + mean (its checkpoint's age_mean and age_std)."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def of(cls, ckpt: dict) -> AgeUnits:
        return cls(ckpt["age_mean"], ckpt["age_std"])


@dataclass(frozen=True)
class Validation:
    """A fold's validation labels (ages in years, gender) with its age scale and the objective it trains on: val_loss
    is that objective (unsmoothed) on the validation rows."""

    objective: Objective
    scale: AgeScale
    age: np.ndarray
    gender: np.ndarray

    def loss_sum(self) -> LossSum:
        return LossSum(self.objective, self.scale.to_target(self.age), self.gender)

    @property
    def units(self) -> AgeUnits:
        return AgeUnits(self.scale.mean, self.scale.std)


@torch.inference_mode()
def predict_arrays(
    model: AgeGenderNet,
    images: np.ndarray,
    rows: np.ndarray,
    how: Inference,
    units: AgeUnits = AgeUnits(),
    desc: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Ages in years and gender probabilities of images[rows], averaged over the TTA views (`desc`: the label of a
    progress bar; none without)."""
    settings = LoaderSettings(how.workers, pin_memory=how.device.type == "cuda")
    loader = make_loader(FaceDataset(images, rows), how.batch_size, train=False, settings=settings)
    batches = tqdm(loader, desc=desc or "predict", unit="batch", leave=False, disable=None if desc else True)
    return _image_predictions(model, batches, how, units)


@torch.inference_mode()
def validate_images(
    model: AgeGenderNet, loader: DataLoader, how: Inference, val: Validation
) -> tuple[np.ndarray, np.ndarray, float]:
    """predict_arrays' result for the rows of a fold's validation loader, and val_loss (how.tta: only "none", as
    the loss takes each row once)."""
    loss = val.loss_sum()
    age, prob = _image_predictions(model, loader, how, val.units, loss.take)
    return age, prob, loss.value


def _image_predictions(model: AgeGenderNet, batches, how: Inference, units: AgeUnits, take=None):
    """`take`: LossSum.take, given each batch's raw outputs (the head's own), giving the plain ones."""

    def views(batch: torch.Tensor):
        x = to_model_input(batch, how.device)
        with autocast(how.device, how.precision):
            for name in how.tta:
                out = model(apply_tta(x, name), raw=take is not None)
                yield out if take is None else take(model, *out)

    with evaluating(model):
        return tta_average((views(x) for x, _, _ in batches), units)


@torch.inference_mode()
def predict_cached(
    model: AgeGenderNet, trunk: CachedTrunk, how: Inference, units: AgeUnits = AgeUnits()
) -> tuple[np.ndarray, np.ndarray]:
    """The validation rows' predictions (no TTA) from a phase's cached trunk, at the precision of predict_arrays."""
    return _cached_predictions(model, trunk, how, units)


@torch.inference_mode()
def validate_cached(
    model: AgeGenderNet, trunk: CachedTrunk, how: Inference, val: Validation
) -> tuple[np.ndarray, np.ndarray, float]:
    """predict_cached's result, and val_loss."""
    loss = val.loss_sum()
    age, prob = _cached_predictions(model, trunk, how, val.units, loss.take)
    return age, prob, loss.value


def _cached_predictions(model: AgeGenderNet, trunk: CachedTrunk, how: Inference, units: AgeUnits, take=None):
    ages, probs = [], []
    with evaluating(model):
        for i in range(0, len(trunk.val), how.batch_size):
            with autocast(how.device, how.precision):
                out = trunk.forward(model, trunk.val[i : i + how.batch_size], raw=take is not None)
                a, g = out if take is None else take(model, *out)
            ages.append(a.float().cpu().numpy() * units.std + units.mean)
            probs.append(torch.sigmoid(g.float()).cpu().numpy())
    return np.concatenate(ages), np.concatenate(probs)


@torch.inference_mode()
def predict_stored(
    model: AgeGenderNet, stored: StoredViews, rows: np.ndarray, how: Inference, units: AgeUnits = AgeUnits()
) -> tuple[np.ndarray, np.ndarray]:
    """predict_arrays' result for images[rows] from their stored trunk outputs (trunk.stored_tta_inputs: one
    array per TTA view): only the stages above the cut run. The outputs are stored as float16, so the ages agree
    with the image path's to about 0.01 years."""

    def views(idx: np.ndarray):
        for view in stored.views:
            with autocast(how.device, how.precision):
                out = stored.forward(model, torch.from_numpy(view[idx]), raw=False)
            yield out

    with evaluating(model):
        batches = (rows[i : i + how.batch_size] for i in range(0, len(rows), how.batch_size))
        return tta_average((views(idx) for idx in batches), units)


def tta_average(batches, units: AgeUnits) -> tuple[np.ndarray, np.ndarray]:
    """Ages in years and gender probabilities from each batch's (age, gender logit) per TTA view, averaged over
    the views."""
    ages, probs = [], []
    for views in batches:
        age = prob = 0.0
        n = 0
        for a, g in views:
            age = age + a.float()
            prob = prob + torch.sigmoid(g.float())
            n += 1
        ages.append((age / n).cpu().numpy() * units.std + units.mean)
        probs.append((prob / n).cpu().numpy())
    if not ages:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(ages), np.concatenate(probs)
