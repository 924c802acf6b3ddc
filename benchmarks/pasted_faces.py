"""Robustness check of predict-images (issue 10; nothing is tuned on it): developer-set UTKFace chips pasted at
30-60% of the width of larger scenes (skimage photos or noise; 640-1280 px wide), tilted by up to 10 degrees and
saved as JPEG, are predicted through predict_images (decode, detect, align, crop, bundle) and must score within
0.02 of the same faces predicted as chips (cropped to their best face when the bundle was trained with
data.face_crop=detect). Also reports detector recall and the IoU between the crop's square
and the pasted chip's square. The chips used to fit the framing (benchmarks/face_framing.py) are left out.

    .venv/bin/python benchmarks/pasted_faces.py BUNDLE --root ../shared/data/utkface [--n 500] [--holdout]

--holdout takes the faces from the 10% held-out split of configs/utkface_cpu.yaml instead (for a bundle of that
run, whose folds trained on every developer-set chip).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from face_framing import CHIP_CORNERS, REPO, dev_paths  # noqa: E402

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.metrics import evaluate  # noqa: E402
from pipeline.data import faces  # noqa: E402
from pipeline.data.competition import load_competition, parse_utkface_name  # noqa: E402
from pipeline.serving.photos import predict_images, read_photo  # noqa: E402

BACKGROUNDS = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "hubble_deep_field", "noise")


def holdout_paths(root: str, n: int, seed: int) -> list[str]:
    cfg = load_config(str(REPO / "configs" / "utkface_cpu.yaml"), [f"data.root={root}"])
    test = load_competition(cfg).test  # the held-out 10%: no fold of the run trained on it
    return test.sample(n=min(n, len(test)), random_state=seed).path.tolist()


def background(name: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    if name == "noise":
        small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img = getattr(data, name)()
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img[:, :, :3]
    scale = max(w / img.shape[1], h / img.shape[0])  # cover the scene, then a random window of it
    img = cv2.resize(img, (max(w, round(img.shape[1] * scale)), max(h, round(img.shape[0] * scale))))
    y, x = rng.integers(0, img.shape[0] - h + 1), rng.integers(0, img.shape[1] - w + 1)
    return np.ascontiguousarray(img[y : y + h, x : x + w])


def make_scene(chip: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The chip pasted into a scene; returns the scene and the chip's 4 corners in it."""
    w = int(rng.integers(640, 1281))
    h = round(w * rng.choice([0.75, 1.0, 4 / 3]))
    scene = background(str(rng.choice(BACKGROUNDS)), w, h, rng)
    side = rng.uniform(0.3, 0.6) * w
    angle = rng.uniform(-10, 10)
    half = side / 2 * (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle))))
    centre = np.array([rng.uniform(half, w - half), rng.uniform(half, h - half)])
    m = cv2.getRotationMatrix2D((100, 100), angle, side / 200)
    m[:, 2] += centre - 100
    inside = cv2.warpAffine(np.full((200, 200), 255, np.uint8), m, (w, h)) > 127
    scene[inside] = cv2.warpAffine(chip, m, (w, h), flags=cv2.INTER_LINEAR)[inside]
    corners = cv2.transform(CHIP_CORNERS[None].astype(np.float64), m)[0]
    return scene, corners


def frame_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter, _ = cv2.intersectConvexConvex(a.astype(np.float32), b.astype(np.float32))
    union = cv2.contourArea(a.astype(np.float32)) + cv2.contourArea(b.astype(np.float32)) - inter
    return float(inter / union)


def match(preds: pd.DataFrame, corners: np.ndarray) -> tuple[pd.Series, bool]:
    """The predicted row of the face nearest the pasted chip's centre, and whether it is that face."""
    centre, side = corners.mean(0), np.linalg.norm(corners[1] - corners[0])
    found = preds[preds.face >= 0]
    if found.empty:
        return preds.iloc[0], False  # the whole-image prediction
    dist = np.hypot(found.x + found.w / 2 - centre[0], found.y + found.h / 2 - centre[1])
    best = int(np.argmin(dist.to_numpy()))
    return found.iloc[best], bool(dist.iloc[best] < side / 4)


def scores(df: pd.DataFrame, prefix: str) -> dict[str, float]:
    return evaluate(df.age_true, df[f"{prefix}age"], df.gender_true, df[f"{prefix}gender"], threshold=0.5)


def best_crop(rgb: np.ndarray) -> np.ndarray:
    """The image cache's face crop (data.face_crop=detect): its best face, or the image itself when it has none."""
    found = faces.detect_faces(rgb)
    return faces.crop_face(rgb, found[0]) if found else rgb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--root", default="../shared/data/utkface")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="per-face CSV")
    ap.add_argument("--holdout", action="store_true", help="faces from the held-out split, not the developer set")
    ap.add_argument("--detect-size", type=int, default=faces.DETECT_MAX_SIDE, help="predict-images' --detect-size")
    args = ap.parse_args()
    from pipeline.exporting.torch_runtime import load_bundle  # torch or ONNX bundles

    bundle = load_bundle(args.bundle)
    if args.holdout:
        paths = holdout_paths(args.root, args.n, args.seed)
    else:
        framing = set(dev_paths(args.root, 3000, 0))
        paths = [p for p in dev_paths(args.root, 10**9, args.seed) if p not in framing][: args.n]
    labels = [parse_utkface_name(Path(p).name) for p in paths]
    chips = [read_photo(p) for p in paths]
    # a bundle trained on detected crops (data.face_crop=detect) sees its chips through the same step
    as_trained = [best_crop(c) for c in chips] if bundle.face_crop == "detect" else chips
    chip_preds = bundle.predict(as_trained)

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        scene_paths, truths, ious = [], [], []
        for i, chip in enumerate(chips):
            scene, corners = make_scene(chip, rng)
            path = os.path.join(tmp, f"scene{i:05d}.jpg")
            cv2.imwrite(path, scene[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            scene_paths.append(path)
            truths.append(corners)
            found = faces.detect_faces(read_photo(path))
            ious.append(max((frame_iou(faces.frame_corners(f), corners) for f in found), default=0.0))
        t0 = time.time()
        preds = predict_images(bundle, scene_paths, whole_image_if_no_face=True, detect_size=args.detect_size)
        secs = time.time() - t0
    rows = []
    for i, (path, corners) in enumerate(zip(scene_paths, truths, strict=True)):
        row, hit = match(preds[preds.file == path], corners)
        rows.append(
            {
                "file": Path(paths[i]).name,
                "age_true": labels[i][0],
                "gender_true": labels[i][1],
                "chip_age": chip_preds.age.iat[i],
                "chip_gender": chip_preds.gender.iat[i],
                "pasted_age": row.age,
                "pasted_gender": row.gender,
                "found": hit,
                "faces_in_scene": int((preds[preds.file == path].face >= 0).sum()),
                "crop_iou": ious[i],
            }
        )
    df = pd.DataFrame(rows)
    if args.out:
        df.to_csv(args.out, index=False)
    chip, pasted = scores(df, "chip_"), scores(df, "pasted_")
    table = pd.DataFrame({"chips": chip, "pasted": pasted}).T
    print(table.round(4).to_string())
    diff = pasted["score"] - chip["score"]
    iou = df.crop_iou.to_numpy()
    print(f"faces: {len(df)}; detector recall {df.found.mean():.4f}; extra detections {(df.faces_in_scene > 1).sum()}")
    print(
        f"crop IoU with the pasted chip: mean {iou.mean():.3f} median {np.median(iou):.3f} "
        f"p10 {np.percentile(iou, 10):.3f}"
    )
    print(
        f"age |pasted - chip|: mean {np.abs(df.pasted_age - df.chip_age).mean():.2f} years; gender agreement "
        f"{(df.pasted_gender == df.chip_gender).mean():.4f}"
    )
    print(
        f"predict_images: {len(df) / secs:.1f} scenes/s, {bundle.runtime} bundle, detect size {args.detect_size} "
        f"(load {os.getloadavg()[0]:.1f})"
    )
    verdict = "PASS" if abs(diff) <= 0.02 else "FAIL"
    print(f"score pasted - chips = {diff:+.4f} ({verdict}: must be within 0.02)")


if __name__ == "__main__":
    main()
