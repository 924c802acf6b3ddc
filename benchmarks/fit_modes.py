"""Which `data.fit` (stretch | center_crop | pad) should be the default for non-square images? (by hand)

UTKFace chips are square, so every fit gives the same pixels on them. Here N chips are first made non-square
in four ways -- cropped to a portrait (200 x 150) or landscape (150 x 200) region, or widened/heightened with
a reflected border (200 x 266 / 266 x 200: more context around the face) -- then each is decoded through the
pipeline's own cache (`cached_images`, PNG files, so no JPEG re-encoding) with each fit at --size px.
Frozen ImageNet features of tf_efficientnet_lite0 (pooled, 1280-d) feed a ridge regression (age) and a
logistic regression (gender), scored by 5-fold cross-validation (the same folds for every variant and fit).

    .venv/bin/python benchmarks/fit_modes.py --data ../shared/data/utkface [--images 3000] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import f1_score, mean_absolute_error, root_mean_squared_error
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.choices import FITS  # noqa: E402
from pipeline.core.config import ModelConfig  # noqa: E402
from pipeline.core.metrics import competition_score  # noqa: E402
from pipeline.data.cache import cached_images  # noqa: E402
from pipeline.data.competition import parse_utkface_name  # noqa: E402
from pipeline.models.backbones import create_model  # noqa: E402

VARIANTS = {
    "square (original)": lambda im: im,
    "portrait crop 200x150": lambda im: im[:, 25:175],
    "landscape crop 150x200": lambda im: im[25:175, :],
    "wider, reflected border 200x266": lambda im: cv2.copyMakeBorder(im, 0, 0, 33, 33, cv2.BORDER_REFLECT_101),
    "taller, reflected border 266x200": lambda im: cv2.copyMakeBorder(im, 33, 33, 0, 0, cv2.BORDER_REFLECT_101),
}


def pick_chips(folder: Path, n: int, seed: int) -> pd.DataFrame:
    rows = [(p, *parsed) for p in sorted(folder.glob("*.jpg")) if (parsed := parse_utkface_name(p.name))]
    df = pd.DataFrame(rows, columns=["path", "age", "gender", "race"])
    return df.sample(n=min(n, len(df)), random_state=seed).reset_index(drop=True)


@torch.inference_mode()
def features(model, images: np.ndarray, batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.array(images[i : i + batch])).permute(0, 3, 1, 2).float()
        out.append(model.backbone((x - model.mean) / model.std).numpy())
    return np.concatenate(out)


def cv_scores(x: np.ndarray, age: np.ndarray, gender: np.ndarray, folds: list) -> dict[str, float]:
    """Per-fold MAE, RMSE, gender accuracy, macro-F1 and competition score, averaged (and the score's sd)."""
    per_fold = []
    for tr, va in folds:
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(0, 5, 11))).fit(x[tr], age[tr])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000)).fit(x[tr], gender[tr])
        pa, pg = np.clip(reg.predict(x[va]), 0, 120), clf.predict(x[va])  # ages clipped as submitted
        rmse, f1 = root_mean_squared_error(age[va], pa), f1_score(gender[va], pg, average="macro")
        per_fold.append(
            {
                "mae": mean_absolute_error(age[va], pa),
                "rmse": rmse,
                "accuracy": float((pg == gender[va]).mean()),
                "f1": f1,
                "score": competition_score(rmse, f1),
            }
        )
    df = pd.DataFrame(per_fold)
    return {**df.mean().to_dict(), "score_sd": float(df.score.std())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/utkface")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    chips = pick_chips(Path(args.data), args.images, args.seed)
    age, gender = chips.age.to_numpy(float), chips.gender.to_numpy(int)
    strata = np.digitize(age, [5, 12, 18, 25, 32, 40, 50, 60, 75]) * 2 + gender
    folds = list(StratifiedKFold(5, shuffle=True, random_state=args.seed).split(age, strata))
    model = create_model(ModelConfig(name="tf_efficientnet_lite0"), load_weights=True).eval()
    print(f"{len(chips)} UTKFace chips, tf_efficientnet_lite0 frozen ImageNet features at {args.size}px, 5-fold CV")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        originals = [cv2.imread(str(p)) for p in chips.path]
        for v, (variant, make) in enumerate(VARIANTS.items()):
            paths = []
            for i, im in enumerate(originals):
                paths.append(f"{tmp}/v{v}_{i}.png")
                cv2.imwrite(paths[-1], make(im))
            for fit in FITS if v else FITS[:1]:  # on square images every fit is the same
                t0 = time.perf_counter()
                images, ok, _ = cached_images(paths, args.size, f"{tmp}/cache", f"v{v}", fit)
                assert ok.all()
                scores = cv_scores(features(model, images), age, gender, folds)
                results.append({"variant": variant, "fit": fit, **scores})
                print(
                    f"{variant:<34}{fit:<13}"
                    + "  ".join(f"{k} {val:.4f}" for k, val in scores.items())
                    + f"  ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    table = pd.DataFrame(results).set_index(["variant", "fit"])
    print("\n" + table.to_string(float_format=lambda x: f"{x:.4f}"))
    mean = table.drop(index="square (original)", level=0).groupby(level="fit").mean()
    print("\nmean over the four non-square variants:\n" + mean.to_string(float_format=lambda x: f"{x:.4f}"))


if __name__ == "__main__":
    main()
