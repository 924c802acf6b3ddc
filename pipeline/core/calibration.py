"""The calibration a blend fitted (inference/calibrate.py) and a bundle carries: age intervals and the rescaling of
the gender probability, applied with numpy only (serving and the offline Kaggle predictor need nothing more).

Gender: the probability people are shown is the blend of every fold's and model's log-odds (the blend's gender
weights, folds averaged), rescaled. Log-odds because a temperature or Platt rescaling fitted on one fold model's
out-of-fold output then applies unchanged to an average of fold models; an average of probabilities is less
confident than its parts, and a rescaling fitted on single models over-corrects it. The submission's gender
decision (probabilities averaged, the OOF threshold) is not changed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .choices import GENDER_METHODS

EPS = 1e-6
KEYS = ("level", "age", "gender")  # Calibration.to_json's; the rest of blend.json's entry is its figures


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(np.asarray(z, float), -50, 50)))


@dataclass
class AgeIntervals:
    """Per bin of predicted age (its lower edge), the residual quantiles: interval = [age + low, age + high]."""

    level: float
    edges: list[float]
    low: list[float]
    high: list[float]

    def bounds(self, age: np.ndarray, max_age: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
        age = np.asarray(age, float)
        b = np.maximum(np.searchsorted(self.edges, age, side="right") - 1, 0)
        low = np.clip(age + np.asarray(self.low)[b], 0, max_age)
        high = np.clip(age + np.asarray(self.high)[b], 0, max_age)
        return low, high


@dataclass
class GenderRescaling:
    """The blended log-odds z -> the probability of code 1 shown: temperature sigmoid(a z), platt sigmoid(a z + b),
    isotonic (steps x -> y on sigmoid(z)), or none sigmoid(z)."""

    method: str
    a: float = 1.0
    b: float = 0.0
    x: list[float] | None = None
    y: list[float] | None = None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, float)
        if self.method == "isotonic":
            return np.interp(sigmoid(z), self.x, self.y)
        if self.method == "none":
            return sigmoid(z)
        return sigmoid(self.a * z + self.b)


@dataclass
class Calibration:
    """blend.json's "calibration" entry without its figures: what a bundle needs to give intervals and calibrated
    probabilities."""

    age: AgeIntervals
    gender: GenderRescaling

    @property
    def level(self) -> float:
        return self.age.level

    def to_json(self) -> dict[str, Any]:
        age = asdict(self.age)
        gender = {k: v for k, v in asdict(self.gender).items() if v is not None}
        return {"level": age.pop("level"), "age": age, "gender": gender}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Calibration:
        """Raises KeyError, TypeError or ValueError("calibration") on a damaged entry (the caller names the file)."""
        age, gender = data["age"], data["gender"]
        intervals = AgeIntervals(float(data["level"]), *(list(map(float, age[k])) for k in ("edges", "low", "high")))
        method = str(gender["method"])
        a, b = float(gender.get("a", 1)), float(gender.get("b", 0))
        x, y = ([float(v) for v in gender[k]] if gender.get(k) is not None else None for k in ("x", "y"))
        edges, low, high = (np.asarray(v) for v in (intervals.edges, intervals.low, intervals.high))
        numbers = np.r_[intervals.level, edges, low, high, a, b, x or [], y or []]
        if not (
            0 < intervals.level < 1
            and np.isfinite(numbers).all()
            and len(edges) == len(low) == len(high) >= 1
            and edges[0] <= 0
            and (np.diff(edges) > 0).all()
            and (low <= high).all()
            and method in GENDER_METHODS
            and (method != "isotonic" or (x and y and len(x) == len(y) and (np.diff(x) >= 0).all()))
        ):
            raise ValueError("calibration")
        return Calibration(intervals, GenderRescaling(method, a, b, x, y))

    @staticmethod
    def split(entry: dict[str, Any] | None) -> tuple[Calibration | None, dict[str, Any] | None]:
        """blend.json's or bundle.json's "calibration" entry -> the calibration and its figures (None, None: no
        entry, from before calibration)."""
        if not entry:
            return None, None
        figures = {k: v for k, v in entry.items() if k not in KEYS}
        return Calibration.from_json(entry), figures or None


def min_age_answer(low: np.ndarray, high: np.ndarray, min_age: float) -> np.ndarray:
    """Is the person at least min_age? yes when the whole interval is at or above it, no when it is all below,
    unsure when the interval straddles it."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    return np.where(low >= min_age, "yes", np.where(high < min_age, "no", "unsure"))
