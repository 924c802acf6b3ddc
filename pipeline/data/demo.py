"""The built-in demo competition: synthetic "faces" whose age and gender are learnable from drawn
cues (head size, grey hair, wrinkles; hair length, lips, beard). Also the tests' data source."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd


def draw_face(age: float, gender: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    s = size / 96
    img = np.empty((size, size, 3), np.uint8)
    top, bottom = rng.integers(40, 220, 3), rng.integers(40, 220, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    img[:] = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    cx, cy = size // 2 + int(rng.integers(-4, 5) * s), size // 2 + int(rng.integers(-3, 4) * s)
    growth = 0.7 + 0.3 * min(age, 18) / 18
    rx, ry = int(24 * s * growth), int(31 * s * growth)
    grey = float(np.clip((age - 35) / 45, 0, 1))
    hair = np.array(rng.choice([(30, 25, 20), (70, 50, 30), (150, 120, 60), (25, 25, 25)])) * (1 - grey) + 225 * grey
    hair = tuple(int(c) for c in hair)
    long_hair = (gender == 1) != (rng.random() < 0.12)  # a cue, not a rule
    if long_hair:  # hair down both sides
        cv2.rectangle(img, (cx - rx - int(7 * s), cy - ry // 2), (cx + rx + int(7 * s), cy + ry), hair, -1)
    skin = tuple(int(c) for c in rng.choice([(230, 195, 170), (200, 150, 110), (140, 95, 60), (90, 60, 40)]))
    cv2.ellipse(img, (cx, cy), (rx, ry), 0, 0, 360, skin, -1)
    cv2.ellipse(img, (cx, cy - ry // 2), (rx + 2, ry // 2 + 2), 0, 180, 360, hair, -1)
    eye_y = cy - ry // 6
    for dx in (-rx // 2, rx // 2):
        cv2.circle(img, (cx + dx, eye_y), max(1, int(3 * s)), (20, 20, 20), -1)
    for i in range(int(age // 12)):  # forehead wrinkles
        y = eye_y - int((5 + 3 * i) * s)
        if y > cy - ry // 2:
            cv2.line(img, (cx - rx // 2, y), (cx + rx // 2, y), tuple(int(c * 0.6) for c in skin), 1)
    lips = (170, 30, 50) if gender == 1 and rng.random() < 0.7 else tuple(int(c * 0.7) for c in skin)
    cv2.ellipse(img, (cx, cy + ry // 2), (rx // 3, max(1, int(3 * s))), 0, 0, 360, lips, -1)
    if gender == 0 and age > 16 and rng.random() < 0.6:  # beard
        cv2.ellipse(img, (cx, cy + ry // 2), (rx - 3, ry // 2), 0, 0, 180, hair, int(4 * s))
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_demo(root: str | Path, n_train: int = 480, n_test: int = 120, size: int = 96, seed: int = 0) -> Path:
    """Write a Kaggle-layout competition: train.csv, train/, test.csv, test/, sample_submission.csv."""
    root = Path(root)
    if (root / "sample_submission.csv").is_file():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        ages = np.clip(rng.gamma(3.0, 11.0, n), 1, 90).round()
        genders = rng.integers(0, 2, n)
        ids = [f"{split}_{i:05d}" for i in range(n)]
        for i, a, g in zip(ids, ages, genders):
            bgr = cv2.cvtColor(draw_face(a, g, rng, size), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(root / split / f"{i}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if split == "train":
            pd.DataFrame({"id": ids, "age": ages.astype(int), "gender": genders}).to_csv(
                root / "train.csv", index=False
            )
        else:
            pd.DataFrame({"id": ids}).to_csv(root / "test.csv", index=False)
            pd.DataFrame({"id": ids, "age": 0, "gender": 0}).to_csv(root / "sample_submission.csv", index=False)
    return root
