"""The command line: agegender (or python -m pipeline) COMMAND ..., one argparse parser with a subcommand per entry
of COMMANDS, each with --help. Only the chosen command's options are added and its stage imported when it runs, so
that predict-images and app need only the serving side. Positional key=value items are config overrides."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import BundleError, OutOfTime, PipelineError
from ..core.extras import check_python, require

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would ask PyPI for news on every import

PROG = "agegender"
EXPORT_FORMATS = ("torch", "onnx", "kaggle")
OLD_OPTIONS = ("model", "fold", "trials", "folds", "format", "python", "wheels", "file", "message")  # now --flags
EPILOG = """examples:
  agegender run demo                                  the synthetic demo competition, end to end
  agegender run CONFIG data.root=DIR train.batch_size=32  key=value overrides any config entry (docs/CONFIG.md)
  agegender train CONFIG --model NAME --fold 0        one backbone, one fold
  agegender export CONFIG --format onnx               a torch-free bundle for predict-images and app
  agegender predict-images BUNDLE photos/ --out preds.csv
launcher=ray runs every (model, fold) job as a Ray task (ray.address: "" = this machine, auto or HOST:PORT)."""


class UsageError(Exception):
    """A command line that does not parse: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own prints the whole usage, then the message, and exits
        raise UsageError(f"{message} (usage: {' '.join(self.format_usage().split()[1:])})")


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        metavar="CONFIG",
        help="a YAML file, or a recipe shipped in the package by name: demo, utkface_cpu, utkface_cpu_long, "
        "utkface_gpu, kaggle_offline",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],  # argparse would require a "*" positional without one
        metavar="key=value",
        help="override any config entry, e.g. train.batch_size=32 models.0.name=tf_efficientnet_lite1 "
        "experiment=NEW_NAME (every key: docs/CONFIG.md)",
    )


def _stage_options(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("--model", metavar="NAME", help="only this model of the config (default: every model)")
    p.add_argument("--fold", type=int, metavar="K", help="only this fold (default: every fold)")


def _fold_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers separated by commas, e.g. 0,1; got {text!r}") from None


def _tune_options(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument(
        "--trials", type=int, metavar="N", help="how many trials to run (tune.trials; default: the config's)"
    )
    p.add_argument(
        "--folds",
        type=_fold_list,
        metavar="0,1",
        help="the folds each trial trains on, its figure the mean over them (tune.folds; default: the config's)",
    )


def _export_options(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="torch",
        help="torch: safetensors (the default); onnx: onnxruntime only, no torch needed to predict; kaggle: the ONNX "
        "bundle as a Kaggle dataset that writes the submission offline (runs/<experiment>/kaggle/)",
    )
    p.add_argument(
        "--python",
        metavar="3.12",
        help="--format kaggle: the Python of the notebook image the wheels are for (default: Kaggle's, 3.12)",
    )
    p.add_argument(
        "--wheels",
        metavar="DIR",
        default="",
        help="--format kaggle: take the wheels from this local wheelhouse instead of the package index",
    )


def _submit_options(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("--file", metavar="PATH", default="", help="the CSV to submit (default: the experiment's newest)")
    p.add_argument(
        "--message",
        metavar="TEXT",
        default="",
        help="your text, added to the message (experiment, cross-fitted CV, config digest, commit)",
    )
    p.add_argument("--wait", action="store_true", help="poll until Kaggle has scored it")


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write it to")


def _photos_options(p: argparse.ArgumentParser) -> None:
    from ..serving.photos import add_arguments

    add_arguments(p)


def _app_options(p: argparse.ArgumentParser) -> None:
    from ..serving.app import add_arguments

    add_arguments(p)


def _torch_runners(*args):
    """serving.bundle's RunnersFactory for torch bundles: torch is imported only when a torch bundle loads."""
    try:
        from ..exporting.torch_runtime import torch_runners
    except ImportError as e:
        raise BundleError(
            f"a torch bundle needs torch and timm ({e}): pip install 'agegender[train]'; or export --format onnx"
        ) from None
    return torch_runners(*args)


def _stage(args: argparse.Namespace) -> int:
    from ..core.config import load_config
    from .run import run

    run(args.command, load_config(args.config, args.overrides), model=args.model, fold=args.fold)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from ..core.config import load_config
    from .tune import tune, tune_overrides

    overrides = [*args.overrides, *tune_overrides(args.trials, args.folds)]
    tune(load_config(args.config, overrides), args.config, overrides)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..exporting.export import export_cli

    return export_cli(args.config, args.overrides, args.format, args.python, args.wheels)


def _submit(args: argparse.Namespace) -> int:
    from ..core.config import load_config
    from .submit import submit

    submit(load_config(args.config, args.overrides), args.file, args.message, args.wait)
    return 0


def _submissions(args: argparse.Namespace) -> int:
    from ..core.config import load_config
    from .submit import submissions

    submissions(load_config(args.config, args.overrides))
    return 0


def _predict_images(args: argparse.Namespace) -> int:
    from ..serving.photos import run_cli

    return run_cli(args, _torch_runners)


def _app(args: argparse.Namespace) -> int:
    from ..serving.app import run_cli

    return run_cli(args, _torch_runners)


def _demo(args: argparse.Namespace) -> int:
    from ..data.demo import make_demo

    print(f"demo competition in {make_demo(args.out_dir)}")
    return 0


@dataclass(frozen=True)
class Command:
    help: str
    options: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments to its parser
    run: Callable[[argparse.Namespace], int]  # the exit code
    serving: bool = False  # handles its own errors and Ctrl-C (a bundle, not a run)


COMMANDS = {
    "run": Command("run every stage in order: folds, train, predict, blend", _stage_options, _stage),
    "folds": Command("write the fold indices (folds/)", _stage_options, _stage),
    "train": Command("train every (model, fold) job still to train, or the one given", _stage_options, _stage),
    "predict": Command("TTA out-of-fold and test predictions of the trained folds", _stage_options, _stage),
    "blend": Command("OOF-chosen blend weights -> the report and submissions/", _stage_options, _stage),
    "tune": Command("Ray Tune trials over tune.space -> runs/<experiment>/tune/best.yaml", _tune_options, _tune),
    "export": Command(
        "the blended ensemble -> runs/<experiment>/bundle/ and an archive of it, or a Kaggle dataset",
        _export_options,
        _export,
    ),
    "submit": Command(
        "the newest submission -> Kaggle's data.competition, CV in the message, submissions/ledger.csv",
        _submit_options,
        _submit,
    ),
    "submissions": Command(
        "Kaggle's scores -> the ledger, the CV-public correlation, a plot in the report", _config, _submissions
    ),
    "predict-images": Command(
        "detect the faces on any photos and predict each face with a bundle", _photos_options, _predict_images, True
    ),
    "app": Command("a web page on 127.0.0.1: drop photos, see each face's age and gender", _app_options, _app, True),
    "demo": Command("write the synthetic demo competition to OUT_DIR", _demo_options, _demo),
}

NEEDS = {  # command -> the extra it cannot run without (predict-images checks its bundle's runtime itself)
    **dict.fromkeys(("run", "folds", "train", "predict", "blend", "tune", "submissions"), "train"),
    "export": "export",
    "app": "app",
    "submit": "kaggle",
}


def _parser(command: str | None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The parser, and the chosen command's own (the only one whose options are added)."""
    parser = _Parser(
        prog=PROG,
        description="Age and gender from face images: a cross-validated Kaggle pipeline (python -m pipeline is the "
        "same command).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands (agegender COMMAND --help: its options)"
    )
    chosen = None
    for name, c in COMMANDS.items():
        p = sub.add_parser(name, help=c.help, description=c.help[0].upper() + c.help[1:] + ".")
        if name == command:
            c.options(p)
            chosen = p
    return parser, chosen


def _old_style(args: argparse.Namespace, item: str) -> str | None:
    """What to use instead of yesterday's key=value command options, which are not config keys."""
    key, _, value = item.partition("=")
    if key == "gender_labels":
        return f"use data.gender_labels=[{value}]"
    if args.command == "tune" and key in ("model", "fold"):
        return f"use tune.model={value}" if key == "model" else f"use --folds {value}"
    if key not in OLD_OPTIONS:
        return None
    if hasattr(args, key):
        return f"use --{key} {shlex.quote(value)}"
    return f"{PROG} {args.command} has no --{key} ({PROG} {args.command} --help)"


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line as a Namespace (its command in .command); UsageError when it does not parse."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser, chosen = _parser(command)
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # key=value items after a flag come back as extras
        args.overrides = [*args.overrides, *(a for a in extra if not a.startswith("-"))]
        extra = [a for a in extra if a.startswith("-")]
        for item in args.overrides:
            if instead := _old_style(args, item):
                raise UsageError(f"{item} is not a config key: {instead}")
    if extra:
        (chosen or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The `agegender` command (pyproject's console script) and python -m pipeline."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        _parser(None)[0].print_help()
        return 2
    try:
        args = parse(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help printed
        return e.code if isinstance(e.code, int) else 0
    command = COMMANDS[args.command]
    try:
        check_python()
        if args.command in NEEDS:
            require(NEEDS[args.command], args.command)
        if args.command == "tune":
            require("ray", "tune")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if command.serving:
        return command.run(args)
    try:
        return command.run(args)
    except OutOfTime as e:  # the time budget: a clean stop, not an error
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except PipelineError as e:  # anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished epochs and folds are kept; run the same command again to resume", file=sys.stderr)
        return 130
