"""Where every file of a run lives and what the checkpoints hold: the one home of the paths under runs/, folds/
and submissions/ (relative to the working folder, as the CLI is run) and of the checkpoint schema.

    folds/<dataset>-k<K>-s<seed>.csv          id, fold                                 (data/folds.py)
    runs/<experiment>/config.json, .yaml      the resolved config the experiment was claimed with
    runs/<experiment>/<model>/fold<k>/        one (model, fold) job: FOLD_FILES below
    runs/<experiment>/data_report.json        images used and skipped, and why
    runs/<experiment>/oof_blend.csv           every model's OOF predictions and the blend's (inference/blend.py)
    runs/<experiment>/blend.json              weights, threshold, CV table (what export bundles)
    runs/<experiment>/report.html             plots and tables (inference/report.py)
    runs/<experiment>/bundle[-onnx]/          the exported ensemble, and <experiment>-bundle[-onnx].tar.gz
    runs/<experiment>/tune/                   trials.csv, best.yaml, Ray Tune's state
    submissions/<experiment>-<stamp>.csv      never overwritten
    submissions/ledger.csv                    every Kaggle submission: CV, digest, commit, ref, scores (append-only)
    runs/<experiment>/kaggle/                 export format=kaggle: a Kaggle dataset that predicts offline
"""

from __future__ import annotations

import re
from pathlib import Path

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
BLEND = "blend.json"
REPORT = "report.html"
LOCK = ".lock"  # held by the stages that write outside one fold (folds, blend, run)

# runs/<experiment>/<model>/fold<k>/, in the order a job writes them
PSEUDO_LABELS = "pseudo_labels.csv"  # a student's copy of its teacher's test predictions (training/pseudo.py)
START_WEIGHTS = "start_weights.json"  # {"file", "tag", "mean", "std"}: what the fold's network started from
LAST = "last.pt"  # the latest epoch (LastCheckpoint), deleted when the fold is trained
BEST = "best.pt"  # the kept epoch (BestCheckpoint)
EPOCH_METRICS = "metrics.csv"  # one row per epoch
TRAIN_DONE = "train_done.json"  # {"best_epoch": N, <metric>: value}: the fold is trained
OOF = "oof.csv"  # id, age, gender_prob, age_true, gender_true of the fold's validation rows (TTA)
TEST = "test.csv"  # id, age, gender_prob of every test image (TTA)
PREDICT_DONE = "predict_done.json"  # {"tta", "oof_rows", "test_rows", "oof": metrics}: the fold is predicted
DONE_MARKERS = (TRAIN_DONE, PREDICT_DONE)  # written last: a fold without them is unfinished

# runs/<experiment>/tune/
TRIALS = "trials"  # trials/<trial id>/: each trial's folds (fold folders as above) and TRIAL_DONE
TRIAL_DONE = "trial_done.json"  # {"params": the trial's values, "cv_<metric>": mean over its folds}
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
