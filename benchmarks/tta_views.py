"""Test-time augmentation views against each other, on a trained fold's validation rows (by hand).

Each view of `pipeline.models.tta.apply_tta` (none, hflip, zoom, zoom_hflip, shift_left, shift_right) is predicted
once from the fold's validation images with its best checkpoint; each set of views is then scored as the predict
stage averages it (ages, and gender probabilities, averaged over the views). The images come from the run's own
cache; pass data.cache_dir=... if the run used another one.

    .venv/bin/python benchmarks/tta_views.py runs/utkface_cpu_run6 [--model NAME] [--fold 0] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.metrics import evaluate  # noqa: E402
from pipeline.data.cache import prepare_images  # noqa: E402
from pipeline.data.competition import load_competition  # noqa: E402
from pipeline.data.folds import ensure_folds  # noqa: E402
from pipeline.inference.predict import load_best  # noqa: E402
from pipeline.training.evaluation import AgeUnits, predict_arrays  # noqa: E402
from pipeline.training.job import (
    Inference,  # noqa: E402
    fold_rows,  # noqa: E402
)

VIEWS = ["none", "hflip", "zoom", "zoom_hflip", "shift_left", "shift_right"]
SETS = [
    ["none"],
    ["none", "hflip"],  # the recipes' TTA
    ["none", "hflip", "zoom", "zoom_hflip"],
    ["none", "hflip", "shift_left", "shift_right"],
    VIEWS,
    ["zoom", "zoom_hflip"],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run's folder, with config.yaml and the fold's best.pt")
    ap.add_argument("--model", default="", help="a model name of the run (default: its first)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.cache_dir=runs/cache6")
    args = ap.parse_args()
    cfg = load_config(args.run / "config.yaml", args.overrides)
    m = next((m for m in cfg.models if m.name == args.model), None) if args.model else cfg.models[0]
    if m is None:
        sys.exit(f"error: no model {args.model!r} in {args.run}/config.yaml")
    comp = load_competition(cfg)
    folds = ensure_folds(cfg, comp)
    comp, images = prepare_images(comp, cfg, cfg.img_size(m))
    _, val_rows = fold_rows(comp, folds, args.fold)
    cpu = torch.device("cpu")
    model, ckpt = load_best(args.run / m.name / f"fold{args.fold}" / "best.pt", m, cpu, cfg.train.channels_last)
    y, g = comp.train.age.to_numpy()[val_rows], comp.train.gender.to_numpy()[val_rows]

    pred, seconds = {}, {}
    for view in VIEWS:
        how = Inference(cpu, cfg.batch_size(m) * 2, False, 0, (view,))
        start = time.perf_counter()
        pred[view] = predict_arrays(model, images.train, val_rows, how, AgeUnits.of(ckpt))
        seconds[view] = time.perf_counter() - start

    print(f"{m.name} fold {args.fold}: {len(val_rows)} validation images at {cfg.img_size(m)} px")
    print(f"{'views':<55}{'MAE':>8}{'RMSE':>8}{'acc':>8}{'score':>8}{'s':>7}")
    for views in SETS:
        age = np.mean([pred[v][0] for v in views], 0)
        prob = np.mean([pred[v][1] for v in views], 0)
        r = evaluate(y, age, g, prob)
        cost = sum(seconds[v] for v in views)
        print(f"{' + '.join(views):<55}{r['mae']:8.3f}{r['rmse']:8.3f}{r['accuracy']:8.4f}{r['score']:8.4f}{cost:7.0f}")


if __name__ == "__main__":
    main()
