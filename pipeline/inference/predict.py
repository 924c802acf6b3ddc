"""TTA inference of one fold's best checkpoint on its out-of-fold rows and on the test set."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.config import ModelConfig
from ..core.errors import PipelineError
from ..core.files import write_csv
from ..core.layout import BEST, OOF, PREDICT_DONE, TEST, PredictDone
from ..core.metrics import evaluate
from ..models.backbones import create_model
from ..models.network import AgeGenderNet
from ..training.evaluation import AgeUnits, predict_arrays, predict_stored
from ..training.job import FoldJob, Inference
from ..training.trunk import TrunkStore, stored_tta_inputs


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
    done = out / PREDICT_DONE
    if done.is_file():
        print(f"{job.name}: predictions exist, skipping")
        return
    mcfg = replace(job.model, img_size=cfg.img_size(job.model))
    model, ckpt = load_best(out / BEST, mcfg, job.device, cfg.train.channels_last)
    how = Inference.for_job(job, cfg.tta)
    units = AgeUnits.of(ckpt)
    _, val_rows = job.rows()
    stored = None
    if cfg.train.cache_frozen:  # the OOF rows' TTA views went through the frozen trunk before: reuse its outputs
        store = TrunkStore(cfg.data.cache_folder, job.images.train, cfg.train, how.precision)
        stored = stored_tta_inputs(model, store, how.tta)
    if stored is not None:
        age, prob = predict_stored(model, stored, val_rows, how, units)
        print(f"{job.name}: OOF rows from the stored outputs of the frozen trunk ({stored.k} stages)")
    else:
        age, prob = predict_arrays(model, job.images.train, val_rows, how, units, desc=f"{job.name} OOF")
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
    age_t, prob_t = predict_arrays(model, job.images.test, test_rows, how, units, desc=f"{job.name} test")
    test = pd.DataFrame({"id": job.comp.test.id.to_numpy(), "age": age_t, "gender_prob": prob_t})
    oof_metrics = evaluate(oof.age_true, oof.age, oof.gender_true, oof.gender_prob)
    job.tracker.summary({f"oof_tta_{k}": v for k, v in oof_metrics.items()})
    write_csv(oof, out / OOF)
    write_csv(test, out / TEST)
    PredictDone(cfg.tta, len(oof), len(test), oof_metrics).write(out)
    print(f"{job.name}: wrote OOF ({len(oof)} rows) and test ({len(test)} rows) predictions, TTA {cfg.tta}")
