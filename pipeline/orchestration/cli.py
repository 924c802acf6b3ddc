"""CLI: agegender (or python -m pipeline) STAGE CONFIG [model=NAME] [fold=K] [key=value ...] | demo OUT_DIR.
Each stage is imported only when it runs, so that predict-images and app need only the serving side."""

from __future__ import annotations

import os
import sys

from ..core.errors import BundleError, PipelineError
from ..core.extras import check_python, require

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would ask PyPI for news on every import

USAGE = """usage (agegender is python -m pipeline):
  agegender run|folds|train|predict|blend CONFIG [model=NAME] [fold=K] [key=value ...]
  agegender tune CONFIG [trials=N] [folds=0[,1...]] [key=value ...]
  agegender export CONFIG [experiment=NAME] [format=torch|onnx|kaggle] [python=3.12]
                                   [gender_labels=NAME0,NAME1] [wheels=DIR]
  agegender submit CONFIG [file=PATH] [message=TEXT] [--wait] [key=value ...]
  agegender submissions CONFIG [key=value ...]
  agegender predict-images BUNDLE PATH... [--out preds.csv] [--whole-image] [--detect-size PX]
                                   [--workers N] [--batch-size N] [--device cpu|cuda]
  agegender app BUNDLE [--host 127.0.0.1] [--port N] [--max-file-size MB] [--detect-size PX]
  agegender demo OUT_DIR      write the synthetic demo competition to OUT_DIR

stages: folds (write fold indices), train, predict (TTA OOF + test predictions),
        blend (OOF-chosen weights -> submissions/), run (all of them in order),
        tune (Ray Tune trials over tune.space -> runs/<experiment>/tune/best.yaml),
        export (the blended ensemble -> runs/<experiment>/bundle/ and an archive of it; format=kaggle: a Kaggle
                dataset that writes the submission offline, runs/<experiment>/kaggle/),
        submit (the newest submission -> Kaggle's data.competition, CV in the message, submissions/ledger.csv),
        submissions (Kaggle's scores -> the ledger, the CV-public correlation, a plot in the report),
        predict-images (detect faces on any photos, predict each face with a bundle),
        app (a web page on 127.0.0.1: drop photos, see each face's age and gender, download the table)
launcher=ray runs every (model, fold) job as a Ray task (ray.address: "" = this machine, auto or HOST:PORT)
key=value overrides any config entry, e.g. train.batch_size=32 models.0.name=tf_efficientnet_lite1"""


def _fold_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise PipelineError(f"fold={value!r}: give a fold number, e.g. fold=0") from None


def _kaggle_stage(stage: str, config_path: str, args: list[str]) -> int:
    from ..core.config import load_config
    from .submit import submissions, submit

    given, overrides, wait = {}, [], False
    for item in args:
        key, _, value = item.partition("=")
        if item == "--wait" and stage == "submit":
            wait = True
        elif key in ("file", "message") and stage == "submit":
            given[key] = value
        else:
            overrides.append(item)
    cfg = load_config(config_path, overrides)
    if stage == "submit":
        submit(cfg, given.get("file", ""), given.get("message", ""), wait)
    else:
        submissions(cfg)
    return 0


NEEDS = {  # stage -> the extra it cannot run without (predict-images checks its bundle's runtime itself)
    **dict.fromkeys(("run", "folds", "train", "predict", "blend", "tune", "submissions"), "train"),
    "export": "export",
    "app": "app",
    "submit": "kaggle",
}


def _torch_runners(*args):
    """serving.bundle's RunnersFactory for torch bundles: torch is imported only when a torch bundle loads."""
    try:
        from ..exporting.torch_runtime import torch_runners
    except ImportError as e:
        raise BundleError(
            f"a torch bundle needs torch and timm ({e}): pip install 'agegender[train]'; or export format=onnx"
        ) from None
    return torch_runners(*args)


def main(argv: list[str] | None = None) -> int:
    """The `agegender` command (pyproject's console script) and python -m pipeline."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2

    stage, target, rest = argv[0], argv[1], argv[2:]
    try:
        check_python()
        if stage in NEEDS:
            require(NEEDS[stage], stage)
        if stage == "tune":
            require("ray", "tune")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stage == "predict-images":
        from ..serving.photos import predict_images_cli

        return predict_images_cli(argv[1:], _torch_runners)
    if stage == "app":
        from ..serving.app import app_cli

        return app_cli(argv[1:], _torch_runners)
    try:
        if stage == "export":
            from ..exporting.export import export_cli

            return export_cli(target, rest)
        if stage == "demo":
            from ..data.demo import make_demo

            print(f"demo competition in {make_demo(target)}")
            return 0
        from ..core.config import load_config

        if stage in ("submit", "submissions"):
            return _kaggle_stage(stage, target, rest)
        from .run import run

        if stage == "tune":
            from .tune import tune, tune_overrides

            overrides = tune_overrides(rest)
            tune(load_config(target, overrides), target, overrides)
            return 0
        model = fold = None
        overrides = []
        for item in rest:
            if item.startswith("model="):
                model = item.split("=", 1)[1]
            elif item.startswith("fold="):
                fold = _fold_number(item.split("=", 1)[1])
            else:
                overrides.append(item)
        cfg = load_config(target, overrides)
        run(stage, cfg, model=model, fold=fold)
        return 0
    except PipelineError as e:  # anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished epochs and folds are kept; run the same command again to resume", file=sys.stderr)
        return 130
