"""Where every file of a run lives and what the checkpoints hold: the one home of the paths under runs/, folds/
and submissions/ (relative to the working folder, as the CLI is run) and of the checkpoint schema.

    folds/<dataset>-k<K>-s<seed>.csv          id, fold                                 (data/folds.py)
    runs/<experiment>/config.json, .yaml      the resolved config the experiment was claimed with
    runs/<experiment>/<model>/fold<k>/        one (model, fold) job: the fold files below
    runs/<experiment>/data_report.json        images used and skipped, and why
    runs/<experiment>/oof_blend.csv           every model's OOF predictions and the blend's (inference/blend.py)
    runs/<experiment>/blend.json              weights, threshold, CV table (what export bundles)
    runs/<experiment>/report.html             plots and tables (inference/report.py)
    runs/<experiment>/bundle[-onnx]/          the exported ensemble, and <experiment>-bundle[-onnx].tar.gz
    runs/<experiment>/tune/                   trials.csv, best.yaml, Ray Tune's state
    submissions/<experiment>-<stamp>.csv      never overwritten
    submissions/ledger.csv                    every Kaggle submission: CV, digest, commit, ref, scores (append-only)
    runs/<experiment>/kaggle/                 export --format kaggle: a Kaggle dataset that predicts offline
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calibration import Calibration
from .choices import FITS
from .errors import BundleError, PipelineError
from .files import write_text

REPO = Path(__file__).resolve().parents[2]  # the checkout this package runs from (git commit, Ray workers' path)
RUNS = Path("runs")
FOLDS_DIR = Path("folds")
SUBMISSIONS = Path("submissions")
DEMO_ROOT = RUNS / "demo-data"  # data.root=demo: the synthetic competition is written here once

# runs/<experiment>/
CONFIG_JSON = "config.json"  # compared key by key when the experiment is run again
CONFIG_YAML = "config.yaml"  # the same config, readable and runnable
DATA_REPORT = "data_report.json"
OOF_BLEND = "oof_blend.csv"
BLEND = "blend.json"  # BlendFile
BUNDLE_FILE = "bundle.json"  # BundleInfo: in runs/<experiment>/bundle[-onnx]/ and its archive
REPORT = "report.html"
LOCK = ".lock"  # held by the stages that write outside one fold (folds, blend, run)

# runs/<experiment>/<model>/fold<k>/, in the order a job writes them
PSEUDO_LABELS = "pseudo_labels.csv"  # a student's copy of its teacher's test predictions (training/pseudo.py)
START_WEIGHTS = "start_weights.json"  # {"file", "tag", "mean", "std"}: what the fold's network started from
LAST = "last.pt"  # the latest epoch (last_checkpoint below), deleted when the fold is trained
BEST = "best.pt"  # the kept epoch (best_checkpoint below)
EPOCH_METRICS = "metrics.csv"  # one row per epoch
TRAIN_DONE = "train_done.json"  # TrainDone: the fold is trained
OOF = "oof.csv"  # id, age, gender_prob, age_true, gender_true of the fold's validation rows (TTA)
TEST = "test.csv"  # id, age, gender_prob of every test image (TTA)
PREDICT_DONE = "predict_done.json"  # PredictDone: the fold is predicted
DONE_MARKERS = (TRAIN_DONE, PREDICT_DONE)  # written last: a fold without them is unfinished

# runs/<experiment>/tune/
TRIALS = "trials"  # trials/<trial id>/: each trial's folds (fold folders as above) and TRIAL_DONE
TRIAL_DONE = "trial_done.json"  # TrialDone
TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"  # the best finished trial's config, runnable
SEARCH = "search"  # Ray Tune's own state (a crashed search continues from it)

LEDGER = SUBMISSIONS / "ledger.csv"  # orchestration/submit.py
LEADERBOARD_PLOT = "leaderboard.png"  # runs/<experiment>/plots/: CV against public score, from the ledger
KAGGLE_DIR = "kaggle"  # runs/<experiment>/kaggle/ (exporting/kaggle_export.py)
SUBMISSION_NAME = r"{experiment}-\d{{8}}-\d{{6}}(-\d+)?\.csv"  # <experiment>-<YYYYmmdd>-<HHMMSS>[-n].csv


def experiment_dir(experiment: str) -> Path:
    return RUNS / experiment


def fold_dir(exp_dir: Path, model: str, k: int) -> Path:
    return exp_dir / model / f"fold{k}"


def fold_lock(out: Path) -> Path:
    """The lock a (model, fold) job holds: beside its folder, so that deleting the folder keeps no stale lock."""
    return out.parent / f".{out.name}.lock"


def folds_file(dataset: str, n_splits: int, seed: int, groups: str = "none") -> Path:
    grouped = "" if groups == "none" else "-g" + re.sub(r"[^A-Za-z0-9_.]+", "_", groups)
    return FOLDS_DIR / f"{dataset}-k{n_splits}-s{seed}{grouped}.csv"


def error_log(exp_dir: Path, job: str) -> Path:
    """The traceback of a job that failed with a bug (launcher=ray)."""
    return exp_dir / "errors" / f"{job}.txt"


def tune_dir(exp_dir: Path) -> Path:
    return exp_dir / "tune"


def bundle_name(fmt: str) -> str:
    """The bundle folder under runs/<experiment>/ of an export format (torch or onnx)."""
    return "bundle" if fmt == "torch" else "bundle-onnx"


def bundle_weights(model: str, fold: int, fmt: str) -> str:
    """A fold model's file inside a bundle."""
    return f"models/{model}/fold{fold}.{'safetensors' if fmt == 'torch' else 'onnx'}"


def submission_pattern(experiment: str) -> re.Pattern:
    return re.compile(SUBMISSION_NAME.format(experiment=re.escape(experiment)))


def submission_path(folder: Path, experiment: str, stamp: str, n: int = 0) -> Path:
    """The n-th submission of an experiment written in the same second (folder: SUBMISSIONS unless a test says)."""
    return folder / (f"{experiment}-{stamp}.csv" if n == 0 else f"{experiment}-{stamp}-{n}.csv")


# The checkpoints (torch.save of plain dicts of tensors and numbers, read with weights_only=True).


def best_checkpoint(
    state: dict, age_mean: float, age_std: float, age_head: str, epoch: int, metric: str, value: float
) -> dict:
    """best.pt: the kept epoch's weights (the EMA's, when train.ema), the age scale its outputs are on, its age head
    (checked when loading), the epoch and its validation metric under the metric's own name."""
    return {
        "model": state,
        "age_mean": age_mean,
        "age_std": age_std,
        "age_head": age_head,
        "epoch": epoch,
        metric: value,
    }


def last_checkpoint(
    state: dict,
    ema: dict | None,
    optimizer: dict,
    scheduler: dict,
    phase: int,
    epoch: int,
    best,
    history: list,
    scaler: dict | None = None,
) -> dict:
    """last.pt: everything a killed fold resumes from (training/checkpoint.py); `scaler`: fp16's loss scale."""
    return {
        "model": state,
        "ema": ema,
        "scaler": scaler,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "phase": phase,
        "epoch": epoch,
        "best": best,
        "history": history,
    }


# The files between stages: a dataclass each, with its read and write. A file an older or newer version wrote, or a
# damaged one, is refused in one line that says which stage writes it again.


def read_stage_json(path: Path, stage: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the {stage} stage first") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{path}: not valid JSON (damaged); run the {stage} stage again") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: not a {path.name} file; run the {stage} stage again")
    return data


def other_version(path: Path, stage: str, missing) -> PipelineError:
    return PipelineError(
        f"{path} lacks {', '.join(sorted(missing))}: written by another version of the pipeline (or damaged); "
        f"run the {stage} stage again"
    )


def _required(data: dict, keys: tuple[str, ...], path: Path, stage: str) -> None:
    missing = set(keys) - set(data)
    if missing:
        raise other_version(path, stage, missing)


@dataclass(frozen=True)
class TrainDone:
    """train_done.json: the fold is trained; the kept epoch and its validation metric, under the metric's name."""

    best_epoch: int
    metric: str
    value: float

    def write(self, folder: Path) -> None:
        write_text(json.dumps({"best_epoch": self.best_epoch, self.metric: self.value}), folder / TRAIN_DONE)

    @staticmethod
    def read(folder: Path) -> TrainDone:
        path = folder / TRAIN_DONE
        data = read_stage_json(path, "train")
        rest = {k: v for k, v in data.items() if k != "best_epoch"}
        if "best_epoch" not in data or len(rest) != 1:
            raise other_version(path, "train", {"best_epoch", "<metric>"} - set(data))
        ((metric, value),) = rest.items()
        return TrainDone(int(data["best_epoch"]), metric, float(value))


@dataclass(frozen=True)
class PredictDone:
    """predict_done.json: the fold is predicted; its TTA views, row counts and OOF metrics (with TTA)."""

    tta: list[str]
    oof_rows: int
    test_rows: int
    oof: dict[str, float]

    def write(self, folder: Path) -> None:
        data = {"tta": self.tta, "oof_rows": self.oof_rows, "test_rows": self.test_rows, "oof": self.oof}
        write_text(json.dumps(data), folder / PREDICT_DONE)

    @staticmethod
    def read(folder: Path) -> PredictDone:
        path = folder / PREDICT_DONE
        data = read_stage_json(path, "predict")
        _required(data, ("tta", "oof_rows", "test_rows", "oof"), path, "predict")
        return PredictDone(list(data["tta"]), int(data["oof_rows"]), int(data["test_rows"]), dict(data["oof"]))


@dataclass(frozen=True)
class TrialDone:
    """trial_done.json: a tuning trial finished; its parameters and the mean of its folds' best metric."""

    params: dict[str, Any]
    metric: str
    cv: float

    def write(self, folder: Path) -> None:
        write_text(json.dumps({"params": self.params, f"cv_{self.metric}": self.cv}), folder / TRIAL_DONE)

    @staticmethod
    def read(folder: Path, metric: str) -> TrialDone:
        path = folder / TRIAL_DONE
        data = read_stage_json(path, "tune")
        _required(data, ("params", f"cv_{metric}"), path, "tune")
        return TrialDone(dict(data["params"]), metric, float(data[f"cv_{metric}"]))


@dataclass
class BlendFile:
    """blend.json: what the blend stage chose on the OOF predictions and how it scored (what export bundles).

    cv is the headline: the blend scored out of sample (cross-fitted); cv_in_sample the submission's blend (fitted on
    every OOF row) scored on those rows. table and table_at_half: every model's and the blend's OOF metrics at the
    chosen threshold and at 0.5. submission and holdout are added once they exist."""

    oof_rows: int
    metric: str
    cv: float
    cv_in_sample: float | None  # None in blend.json of earlier versions
    cross_fitted: dict[str, float] | None  # None in blend.json of earlier versions (in-sample only)
    cv_unseen_folds: dict[str, Any] | None  # folds.chosen_on set: the cross-fitted scores on the other folds
    table: dict[str, dict[str, float]]
    table_at_half: dict[str, dict[str, float]]
    threshold: float
    age_weights: dict[str, float]
    gender_weights: dict[str, float]
    selection: dict[str, float] | None  # train.select's optimism: mean fold metric at the kept and last epochs
    submission: str | None = None
    holdout: dict[str, float] | None = None
    # Calibration.to_json, plus how the gender rescaling was chosen ("chosen_by": cross-fitted log-loss of each) and
    # its figures ("oof": cross-fitted, "holdout"); None in blend.json of earlier versions
    calibration: dict[str, Any] | None = None

    KEYS = (  # blend.json's keys, in order; "table_at_0.5" is table_at_half
        "oof_rows", "metric", "cv", "cv_in_sample", "cross_fitted", "cv_unseen_folds", "table", "table_at_0.5",
        "threshold", "age_weights", "gender_weights", "selection", "submission", "holdout", "calibration",
    )  # fmt: skip
    OPTIONAL = ("cv_in_sample", "cross_fitted", "cv_unseen_folds", "selection", "submission", "holdout", "calibration")

    def to_json(self) -> dict[str, Any]:
        values = {**vars(self), "table_at_0.5": self.table_at_half}
        out = {k: values[k] for k in self.KEYS}
        return {k: v for k, v in out.items() if v is not None or k not in ("submission", "holdout", "calibration")}

    def write(self, exp_dir: Path) -> None:
        write_text(json.dumps(self.to_json(), indent=2), exp_dir / BLEND)

    @staticmethod
    def read(exp_dir: Path) -> BlendFile:
        path = exp_dir / BLEND
        data = read_stage_json(path, "blend")
        _required(data, tuple(k for k in BlendFile.KEYS if k not in BlendFile.OPTIONAL), path, "blend")
        values = {("table_at_half" if k == "table_at_0.5" else k): data.get(k) for k in BlendFile.KEYS}
        return BlendFile(**values)

    @staticmethod
    def of_weights(
        age_weights: dict[str, float],
        gender_weights: dict[str, float],
        threshold: float,
        calibration: Calibration | None = None,
    ) -> BlendFile:
        """A blend of given weights, scored on nothing (a bundle of untrained models, in tests and benchmarks)."""
        return BlendFile(
            0, "score", float("nan"), None, None, None, {}, {}, threshold, age_weights, gender_weights, None,
            calibration=calibration.to_json() if calibration else None,
        )  # fmt: skip

    @property
    def blend_scores(self) -> dict[str, float]:
        """The blend's OOF metrics: cross-fitted, or in-sample for a blend.json of earlier versions."""
        return self.cross_fitted or self.table["blend"]


BUNDLE_FORMAT, BUNDLE_VERSION = "age-gender-bundle", 1
RUNTIMES = ("torch", "onnx")


@dataclass
class BundleFold:
    fold: int
    age_mean: float  # the age scale the fold's outputs are on
    age_std: float
    epoch: int | None = None  # the kept epoch
    file: str = ""  # its weights in the bundle (bundle_weights), set when they are written


@dataclass
class BundleModel:
    """One backbone of the blend: what builds its network (spec), its input normalisation, blend weights, folds."""

    spec: dict[str, Any]  # ModelConfig.inference_spec: name, arch, img_size, drop_rate, age_head
    mean: list[float]  # per channel, on 0..1 pixels
    std: list[float]
    age_weight: float
    gender_weight: float
    folds: list[BundleFold]

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def img_size(self) -> int:
        return int(self.spec["img_size"])


@dataclass
class GenderCoding:
    threshold: float  # the blend's probability of code 1 (folds' mean) at or above it: code 1; the probability a
    # calibrated bundle shows is rescaled (core/calibration.py), so near the threshold it may fall on the other side
    labels: dict[str, str]  # "0" / "1" -> what the code means
    labels_from: str = ""
    labels_known: bool | None = None  # None in bundles of earlier versions: guessed from the labels


@dataclass
class BundleInfo:
    """bundle.json: everything but the weights an exported ensemble needs to predict, and its model card's facts."""

    runtime: str  # torch (safetensors) or onnx
    experiment: str
    fit: str  # data.fit
    zoom: float  # data.zoom (1.0 in bundles made before it)
    tta: list[str]
    max_age: float
    face_crop: str  # none | detect: whether photos are cropped to their faces first
    gender: GenderCoding
    models: list[BundleModel]
    created: str = ""
    git_commit: str = ""
    versions: dict[str, str] | None = None
    input: str = ""
    oof: dict[str, Any] | None = None  # blend.json's headline figures
    holdout: dict[str, float] | None = None
    data: dict[str, Any] | None = None  # the data report, without file names
    calibration: Calibration | None = None  # None in bundles of earlier versions: no intervals
    calibration_figures: dict[str, Any] | None = None  # blend.json's calibration figures (oof, holdout, chosen_by)

    def to_json(self) -> dict[str, Any]:
        models = [
            {
                **m.spec,
                "mean": m.mean,
                "std": m.std,
                "age_weight": m.age_weight,
                "gender_weight": m.gender_weight,
                "folds": [vars(f) if f.file else {k: v for k, v in vars(f).items() if k != "file"} for f in m.folds],
            }
            for m in self.models
        ]
        g = self.gender
        return {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "runtime": self.runtime,
            "experiment": self.experiment,
            "created": self.created,
            "git_commit": self.git_commit,
            "versions": self.versions,
            "face_crop": self.face_crop,
            "fit": self.fit,
            "zoom": self.zoom,
            "tta": self.tta,
            "max_age": self.max_age,
            "input": self.input,
            "gender": {"threshold": g.threshold, "labels": g.labels, "labels_from": g.labels_from, **(
                {"labels_known": g.labels_known} if g.labels_known is not None else {}
            )},
            "models": models,
            "oof": self.oof,
            "holdout": self.holdout,
            "data": self.data,
            **({"calibration": {**self.calibration.to_json(), **(self.calibration_figures or {})}}
               if self.calibration else {}),
        }  # fmt: skip

    def write(self, folder: Path) -> None:
        (folder / BUNDLE_FILE).write_text(json.dumps(self.to_json(), indent=1))

    @staticmethod
    def from_json(raw: bytes, where: Path) -> BundleInfo:
        """bundle.json's bytes -> BundleInfo; a foreign, damaged or other-version file is refused in one line."""
        try:
            info = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BundleError(f"{where}: {BUNDLE_FILE} is not valid JSON (damaged bundle)") from None
        if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{where}: {BUNDLE_FILE} does not describe an age-gender bundle")
        if info.get("version") != BUNDLE_VERSION:
            raise BundleError(
                f"{where}: bundle version {info.get('version')!r}; this pipeline reads version {BUNDLE_VERSION}"
            )
        missing = [k for k in ("runtime", "models", "gender", "fit", "tta", "max_age") if k not in info]
        if missing:
            raise BundleError(f"{where}: {BUNDLE_FILE} lacks {', '.join(missing)} (damaged or foreign bundle)")
        try:
            bundle = _bundle_info(info)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{where}: {BUNDLE_FILE} has no valid {e} (damaged or foreign bundle)") from None
        if bundle.runtime not in RUNTIMES:
            raise BundleError(f"{where}: unknown runtime {bundle.runtime!r}")
        if bundle.fit not in FITS:
            raise BundleError(f"{where}: unknown fit {bundle.fit!r}; this pipeline knows {', '.join(FITS)}")
        if not 1 <= bundle.zoom <= 4:
            raise BundleError(f"{where}: zoom {bundle.zoom!r} is no number from 1 to 4 (damaged bundle)")
        return bundle


MODEL_KEYS = ("mean", "std", "age_weight", "gender_weight", "folds")


def _bundle_info(info: dict[str, Any]) -> BundleInfo:
    g = info["gender"]
    calibration, figures = Calibration.split(info.get("calibration"))
    zoom = info.get("zoom", 1.0)
    if isinstance(zoom, bool) or not isinstance(zoom, (int, float)):
        raise ValueError("zoom")
    models = [
        BundleModel(
            spec={k: v for k, v in m.items() if k not in MODEL_KEYS},
            mean=list(m.get("mean") or []),
            std=list(m.get("std") or []),
            age_weight=float(m.get("age_weight") or 0.0),
            gender_weight=float(m.get("gender_weight") or 0.0),
            folds=[
                BundleFold(int(f["fold"]), float(f["age_mean"]), float(f["age_std"]), f.get("epoch"), str(f["file"]))
                for f in m["folds"]
            ],
        )
        for m in info["models"]
    ]
    return BundleInfo(
        runtime=info["runtime"],
        experiment=info.get("experiment", ""),
        fit=info["fit"],
        zoom=float(zoom),
        tta=list(info["tta"]),
        max_age=float(info["max_age"]),
        face_crop=info.get("face_crop", "none"),
        gender=GenderCoding(float(g["threshold"]), dict(g["labels"]), g.get("labels_from", ""), g.get("labels_known")),
        models=models,
        created=info.get("created", ""),
        git_commit=info.get("git_commit", ""),
        versions=info.get("versions"),
        input=info.get("input", ""),
        oof=info.get("oof"),
        holdout=info.get("holdout"),
        data=info.get("data"),
        calibration=calibration,
        calibration_figures=figures,
    )
