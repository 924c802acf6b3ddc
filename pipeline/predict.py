"""TTA inference of one fold's best checkpoint on its out-of-fold rows and on the test set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import ModelConfig
from .errors import PipelineError
from .files import write_csv, write_text
from .job import FoldJob
from .loader import FaceDataset, auto_workers, make_loader, to_model_input
from .metrics import evaluate
from .models import AgeGenderNet, create_model, evaluating
from .trunk import CachedTrunk, stored_tta_inputs


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


TTA_ZOOM = 0.9  # the zoom views keep the central 90% of the image
TTA_SHIFT = 1 / 16  # the shift views move the image by this share of its width, repeating the edge column


def apply_tta(x: torch.Tensor, name: str) -> torch.Tensor:
    """One TTA view of N x 3 x H x W pixels, in the input's dtype (a resampled uint8 view is rounded back, as a
    zoomed photo would be): `none`, `hflip`, `zoom` / `zoom_hflip` (the centre TTA_ZOOM, resized back), `shift_left` /
    `shift_right`. Shared by the predict stage and the exported bundle."""
    if name.endswith("hflip"):
        x = x.flip(3)
    if name.startswith("zoom") or name.startswith("shift"):
        h, w = x.shape[2:]
        y = x.float()
        if name.startswith("zoom"):
            ch, cw = round(h * TTA_ZOOM), round(w * TTA_ZOOM)
            top, left = (h - ch) // 2, (w - cw) // 2
            y = F.interpolate(
                y[:, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False
            )
        else:
            s = max(1, round(w * TTA_SHIFT))
            y = (
                F.pad(y[..., s:], (0, s, 0, 0), mode="replicate")
                if name == "shift_left"
                else F.pad(y[..., :-s], (s, 0, 0, 0), mode="replicate")
            )
        x = y.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else y.to(x.dtype)
    return x


@torch.inference_mode()
def predict_arrays(
    model: AgeGenderNet,
    images: np.ndarray,
    rows: np.ndarray,
    how: Inference,
    age_mean: float = 0.0,
    age_std: float = 1.0,
    desc: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Raw-scale age and gender probability of images[rows], averaged over the TTA views. The model runs in
    eval mode; every module's train/eval mode is restored afterwards (frozen stages stay in eval mode)."""
    loader = make_loader(FaceDataset(images, rows), how.batch_size, False, how.workers, 0, how.device.type == "cuda")
    batches = tqdm(loader, desc=desc or "predict", unit="batch", leave=False, disable=None if desc else True)

    def views(x: torch.Tensor):
        x = to_model_input(x, how.device)
        with torch.autocast(how.device.type, dtype=torch.bfloat16, enabled=how.amp):
            for name in how.tta:
                yield model(apply_tta(x, name))

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
            with torch.autocast(how.device.type, dtype=torch.bfloat16, enabled=how.amp):
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


def load_best(
    path: Path, mcfg: ModelConfig, device: torch.device, channels_last: bool = True
) -> tuple[AgeGenderNet, dict]:
    if not path.is_file():
        raise PipelineError(f"{path}: no trained checkpoint; run the train stage for this model and fold first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("age_head", "regression") != mcfg.age_head:
        raise PipelineError(
            f"{path}: trained with age_head={ckpt.get('age_head', 'regression')}, the config says "
            f"{mcfg.age_head}; use the config it was trained with or another experiment name"
        )
    model = create_model(mcfg, load_weights=False)
    model.load_state_dict(ckpt["model"])
    model = model.to(device)
    return (model.to(memory_format=torch.channels_last) if channels_last else model), ckpt


def predict_fold(job: FoldJob) -> None:
    """Write out/oof.csv (id, age, gender_prob, true labels) and out/test.csv, unless already there."""
    cfg, out, train = job.cfg, job.out, job.comp.train
    done = out / "predict_done.json"
    if done.is_file():
        print(f"{job.name}: predictions exist, skipping")
        return
    model, ckpt = load_best(out / "best.pt", job.model, job.device, cfg.train.channels_last)
    how = Inference.for_job(job, cfg.tta)
    scale = dict(age_mean=ckpt["age_mean"], age_std=ckpt["age_std"])
    _, val_rows = job.rows()
    stored = None
    if cfg.train.cache_frozen:  # the OOF rows' TTA views went through the frozen trunk before: reuse its outputs
        stored = stored_tta_inputs(model, job.images.train, cfg.train, cfg.data.cache_dir, how.tta)
    if stored is not None:
        age, prob = predict_stored(model, stored, val_rows, how, **scale)
        print(f"{job.name}: OOF rows from the stored outputs of the frozen trunk ({stored.k} stages)")
    else:
        age, prob = predict_arrays(model, job.images.train, val_rows, how, desc=f"{job.name} OOF", **scale)
    oof = pd.DataFrame(
        {
            "id": train.id.to_numpy()[val_rows],
            "age": age,
            "gender_prob": prob,
            "age_true": train.age.to_numpy()[val_rows],
            "gender_true": train.gender.to_numpy()[val_rows],
        }
    )
    test_rows = np.arange(len(job.comp.test))
    age_t, prob_t = predict_arrays(model, job.images.test, test_rows, how, desc=f"{job.name} test", **scale)
    test = pd.DataFrame({"id": job.comp.test.id.to_numpy(), "age": age_t, "gender_prob": prob_t})
    oof_metrics = evaluate(oof.age_true, oof.age, oof.gender_true, oof.gender_prob)
    job.tracker.summary({f"oof_tta_{k}": v for k, v in oof_metrics.items()})
    write_csv(oof, out / "oof.csv")
    write_csv(test, out / "test.csv")
    write_text(json.dumps({"tta": cfg.tta, "oof_rows": len(oof), "test_rows": len(test), "oof": oof_metrics}), done)
    print(f"{job.name}: wrote OOF ({len(oof)} rows) and test ({len(test)} rows) predictions, TTA {cfg.tta}")
