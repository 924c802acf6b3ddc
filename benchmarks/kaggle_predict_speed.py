"""The exported Kaggle dataset (export --format kaggle) as a code competition runs it: a fresh virtual environment, the
wheels installed offline by predict_submission.py, then the submission written. Prints the folder's size, the
install and prediction wall times and images/s, against the same bundle predicting in this process.

    .venv/bin/python benchmarks/kaggle_predict_speed.py CONFIG [key=value ...]

The competition folder is the run's own (its sample submission); a run without a test set but with a held-out split
(UTKFace, data.holdout) gets a stand-in folder of its held-out images: test/<id> links and a sample_submission.csv."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the pipeline is imported inside the functions: face detection's worker processes (spawned) import this module
# again, and should not pay for torch, as predict_submission.py's do not


def competition_folder(cfg, tmp: Path) -> tuple[Path, int]:
    from pipeline.data.competition import load_competition

    comp = load_competition(cfg)
    if comp.holdout_labels is None:
        return Path(cfg.data.root), len(comp.test)
    root = tmp / "held-out"
    (root / "test").mkdir(parents=True)
    for tid, path in zip(comp.test.id, comp.test.path):
        os.symlink(os.path.abspath(path), root / "test" / tid)
    pd.DataFrame({"id": comp.test.id, "age": 0, "gender": 0}).to_csv(root / "sample_submission.csv", index=False)
    return root, len(comp.test)


def comp_id(root: Path) -> str:
    return pd.read_csv(root / "sample_submission.csv", nrows=0).columns[0]


def main(argv: list[str]) -> int:
    from pipeline.exporting.export import run_config
    from pipeline.exporting.kaggle_export import folder_size
    from pipeline.serving.bundle import load_bundle
    from pipeline.serving.kaggle_predict import submission

    cfg, exp_dir = run_config(argv[0], argv[1:])
    out = exp_dir / "kaggle"
    if not (out / "predict_submission.py").is_file():
        print(f"{out}: export it first: python -m pipeline export {argv[0]} --format kaggle", file=sys.stderr)
        return 2
    sizes = {name: folder_size(out / name) / 2**20 for name in ("bundle", "wheels", "pipeline")}
    print(f"{out}: {folder_size(out) / 2**20:.1f} MiB (" + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()) + ")")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, n = competition_folder(cfg, tmp)
        venv.EnvBuilder(with_pip=True).create(tmp / "venv")
        env = {"PATH": f"{tmp / 'venv' / 'bin'}:/usr/bin:/bin", "HOME": str(tmp), "PIP_CONFIG_FILE": "/dev/null"}
        args = [str(tmp / "venv" / "bin" / "python"), str(out / "predict_submission.py"), str(root)]
        walls = []
        for run in ("first (installs the wheels)", "second"):
            t0 = time.perf_counter()
            r = subprocess.run([*args, "--out", str(tmp / "sub.csv")], env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            if r.returncode:
                print(r.stdout + r.stderr, file=sys.stderr)
                return 1
            if run == "second":
                ours = pd.read_csv(exp_dir.parents[1] / json.loads((exp_dir / "blend.json").read_text())["submission"],
                                   dtype=str).set_index(comp_id(root))  # fmt: skip
                theirs = pd.read_csv(tmp / "sub.csv", dtype=str).set_index(comp_id(root)).loc[ours.index]
                diff = (theirs.iloc[:, 0].astype(float) - ours.iloc[:, 0].astype(float)).abs().max()
                same = (theirs.iloc[:, 1] == ours.iloc[:, 1]).mean()
                print(f"against the pipeline's own submission: max age difference {diff:.2g} years, genders equal "
                      f"{same:.2%}")  # fmt: skip
            inner = re.search(r"in ([\d.]+)s \(([\d.]+) images/s\)", r.stdout)
            print(f"{run} run: wall {walls[-1]:.1f}s; predicting {n} images {inner.group(1)}s = {inner.group(2)} img/s")
        bundle = load_bundle(out / "bundle")
        names = json.loads((out / "competition.json").read_text())
        t0 = time.perf_counter()
        submission(bundle, root, names)
        here = time.perf_counter() - t0
        print(f"the same bundle in this process: {here:.1f}s = {n / here:.1f} img/s; "
              f"script's second run / in-process wall: {walls[1] / here:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
