"""What each command needs beyond the core install, by pyproject.toml's extras: one line naming the pip command
that adds what is missing, instead of an ImportError deep in a stage."""

from __future__ import annotations

import importlib.util
import sys

from .errors import PipelineError

PYTHONS = ((3, 10), (3, 13))  # the oldest and newest Python the package is tested on (pyproject's requires-python)
DISTRIBUTION = "agegender"
EXTRAS = {  # extra -> the modules it brings that the commands import
    "train": ("torch", "torchvision", "timm", "albumentations", "sklearn", "scipy", "matplotlib"),
    "serve": ("onnxruntime",),
    "export": ("safetensors", "onnx", "onnxruntime", "onnxscript"),
    "app": ("gradio", "onnxruntime"),
    "ray": ("ray", "optuna"),
    "kaggle": ("kaggle", "kagglesdk"),
}


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:2])) -> None:
    (low, high), have = PYTHONS, tuple(version[:2])
    if not low <= have <= high:
        raise PipelineError(
            f"Python {have[0]}.{have[1]} is not supported: {DISTRIBUTION} runs on Python {low[0]}.{low[1]} to "
            f"{high[0]}.{high[1]}"
        )


def missing(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """PipelineError naming `what` and the pip command when a module of `extra` is not installed."""
    if lost := missing(extra):
        raise PipelineError(
            f"{what} needs the {extra!r} extra ({', '.join(lost)} not installed): pip install '{DISTRIBUTION}[{extra}]'"
        )
