"""Predictions of a model on cached images, averaged over TTA views: per-epoch validation (training) and the
predict stage's OOF and test predictions (inference) run the same code."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ..models.network import AgeGenderNet
from ..models.stages import evaluating
from ..models.tta import apply_tta
from .job import Inference, autocast
from .loader import FaceDataset, make_loader, to_model_input
from .losses import LossSum
from .trunk import CachedTrunk


@torch.inference_mode()
def predict_arrays(
    model: AgeGenderNet,
    images: np.ndarray,
    rows: np.ndarray,
    how: Inference,
    age_mean: float = 0.0,
    age_std: float = 1.0,
    desc: str = "",
    loader=None,
    loss: LossSum | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw-scale age and gender probability of images[rows], averaged over the TTA views (`loader`: one already
    made for them, e.g. a fold's validation loader; `loss`: summing the training objective, without TTA). The
    model runs in eval mode; every module's train/eval mode is restored afterwards (frozen stages stay in eval
    mode)."""
    if loader is None:
        cuda = how.device.type == "cuda"
        loader = make_loader(FaceDataset(images, rows), how.batch_size, False, how.workers, 0, cuda)
    batches = tqdm(loader, desc=desc or "predict", unit="batch", leave=False, disable=None if desc else True)

    def views(x: torch.Tensor):
        x = to_model_input(x, how.device)
        with autocast(how.device, how.amp):
            for name in how.tta:
                out = model(apply_tta(x, name), raw=loss is not None)
                yield out if loss is None else loss.take(model, *out)

    with evaluating(model):
        return tta_average((views(x) for x, _, _ in batches), age_mean, age_std)


@torch.inference_mode()
def predict_stored(
    model: AgeGenderNet, trunk: CachedTrunk, rows: np.ndarray, how: Inference, age_mean: float, age_std: float
) -> tuple[np.ndarray, np.ndarray]:
    """predict_arrays' result for images[rows] from their stored trunk outputs (trunk.stored_tta_inputs: one
    array per TTA view): only the stages above the cut run. The outputs are stored as float16, so the ages agree
    with the image path's to about 0.01 years."""

    def views(idx: np.ndarray):
        for view in trunk.views:
            with autocast(how.device, how.amp):
                out = trunk.forward(model, torch.from_numpy(view[idx]), raw=False)
            yield out

    with evaluating(model):
        batches = (rows[i : i + how.batch_size] for i in range(0, len(rows), how.batch_size))
        return tta_average((views(idx) for idx in batches), age_mean, age_std)


def tta_average(batches, age_mean: float, age_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw-scale ages and gender probabilities from each batch's (age, gender logit) per TTA view, averaged over
    the views."""
    ages, probs = [], []
    for views in batches:
        age = prob = 0.0
        n = 0
        for a, g in views:
            age = age + a.float()
            prob = prob + torch.sigmoid(g.float())
            n += 1
        ages.append((age / n).cpu().numpy() * age_std + age_mean)
        probs.append((prob / n).cpu().numpy())
    if not ages:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(ages), np.concatenate(probs)
