"""TTA inference of one fold's best checkpoint on its out-of-fold rows and on the test set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .config import Config, ModelConfig
from .data import Competition
from .errors import PipelineError
from .files import write_csv, write_text
from .loader import FaceDataset, auto_workers, make_loader, to_model_input
from .metrics import evaluate
from .models import AgeGenderNet, create_model
from .tracking import Tracker


def apply_tta(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.flip(3) if name == "hflip" else x


@torch.inference_mode()
def predict_arrays(
    model: AgeGenderNet,
    images: np.ndarray,
    rows: np.ndarray,
    tta: list[str],
    batch_size: int,
    device: torch.device,
    age_mean: float = 0.0,
    age_std: float = 1.0,
    desc: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Average over TTA views of raw-scale age and gender probability for images[rows]."""
    model.eval()
    loader = make_loader(FaceDataset(images, rows), batch_size, False, auto_workers(-1), 0)
    ages, probs = [], []
    amp = device.type == "cuda"
    for x, _, _ in tqdm(loader, desc=desc or "predict", unit="batch", leave=False, disable=None if desc else True):
        x = to_model_input(x, device)
        age = prob = 0.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for name in tta:
                a, g = model(apply_tta(x, name))
                age = age + a.float()
                prob = prob + torch.sigmoid(g.float())
        ages.append((age / len(tta)).cpu().numpy() * age_std + age_mean)
        probs.append((prob / len(tta)).cpu().numpy())
    if not ages:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(ages), np.concatenate(probs)


def load_best(
    path: Path, mcfg: ModelConfig, device: torch.device, channels_last: bool = True
) -> tuple[AgeGenderNet, dict]:
    if not path.is_file():
        raise PipelineError(f"{path}: no trained checkpoint; run the train stage for this model and fold first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = create_model(mcfg, load_weights=False)
    model.load_state_dict(ckpt["model"])
    model = model.to(device)
    return (model.to(memory_format=torch.channels_last) if channels_last else model), ckpt


def predict_fold(
    cfg: Config,
    mcfg: ModelConfig,
    fold: int,
    comp: Competition,
    train_images: np.ndarray,
    test_images: np.ndarray,
    folds: pd.DataFrame,
    fold_dir: Path,
    device: torch.device,
    tracker: Tracker | None = None,
) -> None:
    """Write fold_dir/oof.csv (id, age, gender_prob) and fold_dir/test.csv, unless already there."""
    done = fold_dir / "predict_done.json"
    if done.is_file():
        print(f"{mcfg.name} fold {fold}: predictions exist, skipping")
        return
    model, ckpt = load_best(fold_dir / "best.pt", mcfg, device, cfg.train.channels_last)
    val_ids = set(folds.id[folds.fold == fold])
    val_rows = np.flatnonzero(comp.train.id.isin(val_ids).to_numpy())
    bs = (mcfg.batch_size or cfg.train.batch_size) * 2
    kw = dict(tta=cfg.tta, batch_size=bs, device=device, age_mean=ckpt["age_mean"], age_std=ckpt["age_std"])
    age, prob = predict_arrays(model, train_images, val_rows, desc=f"{mcfg.name} fold {fold} OOF", **kw)
    oof = pd.DataFrame(
        {
            "id": comp.train.id.to_numpy()[val_rows],
            "age": age,
            "gender_prob": prob,
            "age_true": comp.train.age.to_numpy()[val_rows],
            "gender_true": comp.train.gender.to_numpy()[val_rows],
        }
    )
    test_rows = np.arange(len(comp.test))
    age_t, prob_t = predict_arrays(model, test_images, test_rows, desc=f"{mcfg.name} fold {fold} test", **kw)
    test = pd.DataFrame({"id": comp.test.id.to_numpy(), "age": age_t, "gender_prob": prob_t})
    oof_metrics = evaluate(oof.age_true, oof.age, oof.gender_true, oof.gender_prob)
    if tracker is not None:
        tracker.summary({f"oof_tta_{k}": v for k, v in oof_metrics.items()})
    write_csv(oof, fold_dir / "oof.csv")
    write_csv(test, fold_dir / "test.csv")
    write_text(json.dumps({"tta": cfg.tta, "oof_rows": len(oof), "test_rows": len(test), "oof": oof_metrics}), done)
    print(
        f"{mcfg.name} fold {fold}: wrote OOF ({len(oof)} rows) and test ({len(test)} rows) predictions, TTA {cfg.tta}"
    )
