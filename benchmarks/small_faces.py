"""What predict-images' --detect-size trades: recall of small faces against detection time. Held-out UTKFace
chips are pasted, small (3-12% of the width), into 1280 x 960 scenes saved as JPEG; each scene is detected on a
copy of at most --detect-size pixels on its longest side. Prints recall by the pasted face's width in the photo
(about half the chip's side) and the detection time per scene, for each size, measured in one run.

    .venv/bin/python benchmarks/small_faces.py [--root ../shared/data/utkface] [--n 300] [--sizes 1024 800 640 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pasted_faces import background, holdout_paths  # noqa: E402

from pipeline.data import faces  # noqa: E402
from pipeline.serving.photos import read_photo  # noqa: E402

SCENE_W, SCENE_H = 1280, 960
FACE_BINS = [19, 30, 40, 55, 80]  # face width in the photo, pixels (the chip's side / 2)


def small_face_scene(chip: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, int]]:
    scene = background("coffee" if rng.random() < 0.5 else "noise", SCENE_W, SCENE_H, rng)
    side = int(rng.uniform(0.03, 0.12) * SCENE_W)
    x, y = int(rng.integers(0, SCENE_W - side)), int(rng.integers(0, SCENE_H - side))
    scene[y : y + side, x : x + side] = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA)
    _, jpeg = cv2.imencode(".jpg", scene[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    scene = np.ascontiguousarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1])
    return scene, (x + side / 2, y + side / 2, side)


def found(detections: list[faces.Face], cx: float, cy: float, side: int) -> bool:
    return any(
        abs(f.box[0] + f.box[2] / 2 - cx) < side / 3 and abs(f.box[1] + f.box[3] / 2 - cy) < side / 3
        for f in detections
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/data/utkface")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 800, 640, 512])
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    scenes = [small_face_scene(read_photo(p), rng) for p in holdout_paths(args.root, args.n, args.seed)]
    face_width = pd.Series([side / 2 for _, (_, _, side) in scenes])
    bins = pd.cut(face_width, FACE_BINS, right=False)
    recall, ms = {}, {}
    for size in args.sizes:
        t0 = time.perf_counter()
        hits = [found(faces.detect_faces(scene, max_side=size), *where) for scene, where in scenes]
        ms[size] = (time.perf_counter() - t0) / len(scenes) * 1000
        recall[size] = pd.Series(hits, dtype=float).groupby(bins, observed=False).mean()
    table = pd.DataFrame(recall).round(3)
    table.index = [f"{b.left}-{b.right} px (n={(bins == b).sum()})" for b in table.index]
    table.loc["detection ms/scene"] = pd.Series(ms).round(1)
    print(f"recall of faces pasted into {SCENE_W} x {SCENE_H} photos, by face width, for each --detect-size")
    print(table.to_string())


if __name__ == "__main__":
    main()
