"""In a Kaggle notebook: what the run will leave in the saved output (/kaggle/working, 20 GB at most), said before
training starts, with what to change when it would not fit."""

from __future__ import annotations

from pathlib import Path

from ..core.config import Config, ModelConfig
from ..core.session import KAGGLE_OUTPUT_LIMIT, Kaggle
from ..models.backbones import parameter_count

FLOAT = 4  # bytes: checkpoints hold fp32 tensors


def checkpoint_bytes(cfg: Config, m: ModelConfig) -> tuple[int, int]:
    """(best.pt, last.pt) of one fold of `m`: the weights; last.pt also the EMA copy and AdamW's two moments (an
    upper bound: every parameter trainable)."""
    weights = parameter_count(m) * FLOAT
    return weights, weights * (1 + (cfg.train.ema > 0) + 2)


def image_cache_bytes(cfg: Config, models: list[ModelConfig], n_images: int) -> int:
    return sum(n_images * size * size * 3 for size in {cfg.img_size(m) for m in models})


def output_estimate(
    cfg: Config, models: list[ModelConfig], n_folds: int, jobs: int, n_images: int, cache_saved: bool
) -> tuple[int, str]:
    """Bytes the run writes under its working folder (with the image cache when `cache_saved`), and what they are."""
    sizes = {m.name: checkpoint_bytes(cfg, m) for m in models}
    kept = sum(best for best, _ in sizes.values()) * n_folds
    training = sorted((last for _, last in sizes.values()), reverse=True)[:jobs]
    what = f"best.pt of {len(models)} model(s) x {n_folds} fold(s), {len(training)} last.pt while training"
    total = kept + sum(training)
    if cache_saved:
        total += image_cache_bytes(cfg, models, n_images)
        what += ", the image cache (data.cache_dir is under the working folder; frozen-trunk outputs not counted)"
    return total, what


def output_line(cfg: Config, session: Kaggle, models: list[ModelConfig], n_folds: int, jobs: int, n_images: int):
    """The Kaggle line: where outputs and caches go and how big the outputs will be; a warning when they will not
    be saved, or would pass the 20 GB."""
    cache = Path(cfg.data.cache_folder).resolve()
    total, what = output_estimate(cfg, models, n_folds, jobs, n_images, session.saves(cache))
    here = Path.cwd()
    if not session.saves(here):
        return (
            f"warning: this run writes runs/ under {here}, outside {session.working}: Kaggle saves none of it with the "
            f"notebook; cd {session.working} first"
        )
    cache_text = "scratch, not saved" if not session.saves(cache) else "inside the saved output"
    line = (
        f"kaggle: outputs under {here} about {total / 1e9:.1f} GB ({what}; limit {KAGGLE_OUTPUT_LIMIT / 1e9:.0f} GB), "
        f"caches in {cache} ({cache_text})"
    )
    if total > KAGGLE_OUTPUT_LIMIT:
        line = (
            f"warning: {line}: more than Kaggle keeps. Train fewer models or folds (or --fold K per session), and "
            f"keep data.cache_dir on /kaggle/temp (the default)"
        )
    return line
