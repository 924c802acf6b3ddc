"""Measure how the UTKFace chips frame a face, for pipeline/faces.py's CHIP_* constants.

Runs the detector on developer-set chips (the held-out 10% of configs/utkface_cpu.yaml is left alone), fits the
chip square from the detection on one half and reports, on the other half, detector recall and the IoU between
the square computed from the detection and the chip's own frame (the whole 200 x 200 chip).

    .venv/bin/python benchmarks/face_framing.py --root ../shared/data/utkface [--n 3000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.core.config import load_config  # noqa: E402
from pipeline.data import faces  # noqa: E402
from pipeline.data.cache import decode_image  # noqa: E402
from pipeline.data.competition import load_competition  # noqa: E402

CHIP = 200.0
CHIP_CORNERS = np.array([[0, 0], [CHIP, 0], [CHIP, CHIP], [0, CHIP]], dtype=np.float32)


def dev_paths(root: str, n: int, seed: int) -> list[str]:
    cfg = load_config(str(REPO / "configs" / "utkface_cpu.yaml"), [f"data.root={root}"])
    train = load_competition(cfg).train  # the developer set: training rows after the holdout split
    return train.sample(n=min(n, len(train)), random_state=seed).path.tolist()


def detect_all(paths: list[str], pad: float) -> list[faces.Face | None]:
    faces.DETECT_PAD = pad
    found = []
    for p in tqdm(paths, desc=f"detect pad={pad}", unit="chip", mininterval=30):
        rgb = decode_image(p, int(CHIP))
        dets = faces.detect_faces(rgb)
        found.append(dets[0] if dets else None)
    return found


def features(face: faces.Face) -> tuple[float, float, float, np.ndarray]:
    """Eye distance, eye-to-mouth distance, eye angle, and the chip centre's offset from the eye midpoint
    in the eye-aligned frame."""
    pts = np.asarray(face.landmarks)
    eyes, mouth = (pts[0] + pts[1]) / 2, (pts[3] + pts[4]) / 2
    dx, dy = pts[1] - pts[0]
    angle = np.arctan2(dy, dx)
    c, s = np.cos(angle), np.sin(angle)
    off = np.array([[c, s], [-s, c]]) @ (np.array([CHIP / 2, CHIP / 2]) - eyes)
    return float(np.hypot(dx, dy)), float(np.linalg.norm(mouth - eyes)), float(angle), off


def fit(feats: list[tuple], use_eye: bool = True, use_mouth: bool = True) -> dict[str, float]:
    eye = np.array([f[0] for f in feats]) * use_eye
    mouth = np.array([f[1] for f in feats]) * use_mouth
    off = np.array([f[3] for f in feats])
    # side = a * eye + b * mouth, least squares in relative error (every chip's side is 200)
    x = np.stack([eye, mouth], 1) / CHIP
    (a, b), *_ = np.linalg.lstsq(x, np.ones(len(x)), rcond=None)
    side = a * eye + b * mouth
    return {
        "CHIP_EYE_WEIGHT": float(a),
        "CHIP_MOUTH_WEIGHT": float(b),
        "CHIP_DX": float(np.median(off[:, 0] / side)),
        "CHIP_DY": float(np.median(off[:, 1] / side)),
    }


def iou_with_chip(face: faces.Face) -> float:
    corners = faces.frame_corners(face).astype(np.float32)
    inter, _ = cv2.intersectConvexConvex(corners, CHIP_CORNERS)
    area = cv2.contourArea(corners)
    return float(inter / (area + CHIP * CHIP - inter))


def apply(constants: dict[str, float]) -> None:
    for k, v in constants.items():
        setattr(faces, k, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/data/utkface")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    paths = dev_paths(args.root, args.n, args.seed)
    half = len(paths) // 2

    pad = faces.DETECT_PAD
    t0 = time.time()
    padded = detect_all(paths, pad)
    secs = (time.time() - t0) / len(paths)
    bare = detect_all(paths[:500], 0.0)
    faces.DETECT_PAD = pad
    print(f"recall on {len(paths)} chips, padded by {pad}: {np.mean([f is not None for f in padded]):.4f}")
    print(f"recall on 500 chips, no padding: {np.mean([f is not None for f in bare]):.4f}")
    print(f"detect: {secs * 1000:.1f} ms per chip (1 thread)")

    fit_faces = [f for f in padded[:half] if f is not None]
    eval_faces = [f for f in padded[half:] if f is not None]
    feats = [features(f) for f in fit_faces]
    angles = np.degrees([f[2] for f in feats])
    spread = np.percentile(abs(angles), 90)
    print(f"eye angle in the chips: median {np.median(angles):.2f} deg, 90% within {spread:.1f}")
    constants = fit(feats)
    apply(constants)
    print("fitted on", len(fit_faces), "chips:", {k: round(v, 4) for k, v in constants.items()})

    variants = {
        "eye+mouth (fitted)": constants,
        "eye distance only": fit(feats, use_mouth=False),
        "eye-mouth only": fit(feats, use_eye=False),
    }
    for name, const in variants.items():
        apply(const)
        ious = np.array([iou_with_chip(f) for f in eval_faces])
        print(
            f"{name:22s} IoU on {len(ious)} held-apart chips: mean {ious.mean():.3f} median {np.median(ious):.3f} "
            f"p10 {np.percentile(ious, 10):.3f}  >=0.8: {np.mean(ious >= 0.8):.3f}"
        )
    apply(constants)
    box_side = np.array([max(f.box[2], f.box[3]) for f in eval_faces])
    print(f"chip side / detector box side: median {np.median(CHIP / box_side):.3f}")
    print("paste into pipeline/faces.py:")
    for k, v in constants.items():
        print(f"{k} = {v:.4f}")


if __name__ == "__main__":
    main()
