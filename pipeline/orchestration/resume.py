"""resume_from: go on from an earlier session's output (on Kaggle, a notebook's output added as an input, read-only
under /kaggle/input/). The earlier experiment must have been run with this config (the same check as running an
existing experiment again). Its folds file, its saved config and every fold folder this working folder does not
have yet are copied in; then the run goes on as a rerun in place would: finished folds are skipped, unfinished ones
continue from their last.pt. Caches are not copied (they are rebuilt on scratch), and nothing under the folder is
ever written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..core.config import Config, config_changes
from ..core.errors import PipelineError
from ..core.files import atomic_folder, atomic_path
from ..core.layout import CONFIG_JSON, CONFIG_YAML, FOLDS_DIR, LAST, RUNS, TRAIN_DONE, experiment_dir


def earlier_runs(source: Path, experiment: str) -> Path:
    """The folder under `source` that holds runs/<experiment>/config.json (source itself, or a folder in it: a cloned
    repo inside the earlier session's working folder); refused in one line when there is none."""
    roots = [source, *sorted(p for p in source.glob("*") if p.is_dir())]
    holding = [r for r in roots if (r / RUNS).is_dir()]
    if not holding:
        raise PipelineError(
            f"resume_from={source}: it holds no runs/ folder (nor does any folder in it); point it at the earlier "
            "session's output, the folder with its runs/ and folds/"
        )
    for root in holding:
        if (root / experiment_dir(experiment) / CONFIG_JSON).is_file():
            return root
    found = sorted({p.parent.name for r in holding for p in (r / RUNS).glob(f"*/{CONFIG_JSON}")})
    raise PipelineError(
        f"resume_from={source}: it holds no runs of experiment {experiment!r} (it has: {', '.join(found) or 'none'}); "
        "run with the earlier session's experiment name and config"
    )


def earlier_experiment(cfg: Config) -> Path:
    """The experiment folder under cfg.resume_from that this run continues, checked against this config; refused
    in one line when the folder is missing, holds no runs of the experiment, or holds another config's."""
    source = Path(cfg.resume_from).expanduser()
    if not source.is_dir():
        raise PipelineError(f"resume_from={cfg.resume_from}: no such folder")
    earlier = earlier_runs(source, cfg.experiment) / experiment_dir(cfg.experiment)
    changed = config_changes(json.loads((earlier / CONFIG_JSON).read_text()), cfg)
    if changed:
        raise PipelineError(
            f"resume_from={source}: its experiment {cfg.experiment!r} was run with another config (changed: "
            f"{', '.join(changed[:6])}); resume it with the config it was run with"
        )
    return earlier


def take_over(cfg: Config, earlier: Path) -> None:
    """Copy from the earlier experiment folder (earlier_experiment) what this working folder lacks: the folds files,
    the experiment's config and its fold folders (checkpoints, predictions; not caches, locks or temporaries).
    Prints what was taken over."""
    if earlier.resolve() == experiment_dir(cfg.experiment).resolve():
        return  # resuming in place: a plain rerun
    root = earlier.parents[1]
    for name in (CONFIG_JSON, CONFIG_YAML):
        _copy_missing(earlier / name, experiment_dir(cfg.experiment) / name)
    for csv in sorted((root / FOLDS_DIR).glob("*.csv")):
        _copy_missing(csv, FOLDS_DIR / csv.name)
    finished, unfinished = 0, 0
    for fold in sorted(p for p in earlier.glob("*/fold*") if p.is_dir()):
        here = experiment_dir(cfg.experiment) / fold.relative_to(earlier)
        if here.is_dir() and any(here.iterdir()):
            continue  # this session has gone on with it already
        with atomic_folder(here) as tmp:  # the whole fold or nothing: a kill mid-copy leaves no half fold
            for f in sorted(fold.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    shutil.copyfile(f, tmp / f.name)
        finished += (fold / TRAIN_DONE).is_file()
        unfinished += not (fold / TRAIN_DONE).is_file() and (fold / LAST).is_file()
    print(
        f"resume_from: took over {finished} trained fold(s) and {unfinished} unfinished one(s) (they continue from "
        f"their last.pt) from {earlier}; it is only read"
    )


def _copy_missing(src: Path, dst: Path) -> None:
    """Copy one file in atomically (a kill leaves no half file), unless the working folder has it already."""
    if src.is_file() and not dst.exists():
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
