"""Training and inference throughput, measured in one run (by hand, not in CI):

  (a) the pure model step on a batch already in memory,
  (b) our pipeline's real loop (uint8 cache, albumentations, loader, step),
  (c) a naive loop as competition seeds write it (PIL decode of every JPEG every epoch, torchvision
      transforms, DataLoader with workers, NCHW float model),
and the per-epoch cost of gradual-unfreezing phases (cached frozen trunk) against full fine-tuning.

    .venv/bin/python benchmarks/train_speed.py [--data ../shared/data/utkface] [--model tf_efficientnet_lite0]
        [--size 96] [--batch 64] [--images 1536]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import ModelConfig, TrainConfig, Unfreeze  # noqa: E402
from pipeline.data.cache import cached_images  # noqa: E402
from pipeline.data.demo import make_demo  # noqa: E402
from pipeline.models.backbones import create_model  # noqa: E402
from pipeline.models.stages import frozen_prefix_length, set_trainable  # noqa: E402
from pipeline.training.evaluation import predict_arrays  # noqa: E402
from pipeline.training.job import Inference  # noqa: E402
from pipeline.training.loader import (  # noqa: E402
    FaceDataset,
    LoaderSettings,
    auto_workers,
    make_loader,
    to_model_input,
    train_transform,
)
from pipeline.training.trunk import TrunkCache, TrunkStore  # noqa: E402


def step_fn(model, opt, forward=None):
    """One optimiser step; `forward` maps the batch to (age, logit), by default the model itself."""
    forward = forward or model

    def step(x, y_age, y_gender):
        age, logit = forward(x)
        loss = torch.nn.functional.smooth_l1_loss(age, y_age) + torch.nn.functional.binary_cross_entropy_with_logits(
            logit, y_gender
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(fn, n_batches: int, batch: int) -> float:
    """images/s of fn() called for n_batches, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        fn()
    return n_batches * batch / (time.perf_counter() - t0)


class NaiveDataset(Dataset):
    def __init__(self, paths, size, train: bool):
        self.paths = paths
        aug = [T.RandomHorizontalFlip(), T.RandomAffine(10, (0.06, 0.06), (0.9, 1.1)), T.ColorJitter(0.2, 0.2)]
        self.tf = T.Compose(
            [T.Resize((size, size)), *(aug if train else []), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        return self.tf(img), torch.tensor(30.0), torch.tensor(1.0)


def loop_speed(loader, step, max_batches: int, batch: int) -> float:
    it = iter(loader)
    x, a, g = next(it)  # warm-up (and worker start-up) not counted
    step(x, a, g)
    t0, n = time.perf_counter(), 0
    for i, (x, a, g) in enumerate(it):
        if i >= max_batches:
            break
        step(x, a.float(), g.float())
        n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/utkface")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=1536)
    args = ap.parse_args()
    torch.manual_seed(0)

    data = Path(args.data)
    if data.is_dir():
        paths = sorted(str(p) for p in data.glob("*.jpg"))[: args.images]
    else:
        demo = make_demo(Path(tempfile.mkdtemp()) / "demo", n_train=args.images, n_test=0, size=200)
        paths = sorted(str(p) for p in (demo / "train").glob("*.jpg"))
    bs, n_batches = args.batch, len(paths) // args.batch - 2
    print(
        f"{args.model} at {args.size}px, batch {bs}, {len(paths)} images from {data if data.is_dir() else 'demo'}, "
        f"{torch.get_num_threads()} threads, loader workers {auto_workers(-1)}"
    )

    cache_dir = tempfile.mkdtemp()
    images, _, _ = cached_images(paths, args.size, cache_dir, "bench")
    rows = np.arange(len(paths))
    rng = np.random.default_rng(0)
    y_age, y_gender = rng.normal(0, 1, len(rows)).astype(np.float32), rng.integers(0, 2, len(rows)).astype(np.float32)

    def fresh():
        m = create_model(ModelConfig(name=args.model)).to(memory_format=torch.channels_last)
        set_trainable(m, Unfreeze.parse("all"))
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-4)

    # (a) pure step on an in-memory batch
    model, opt = fresh()
    step = step_fn(model, opt)
    xb = to_model_input(torch.from_numpy(np.array(images[:bs])), torch.device("cpu"))
    ya, yg = torch.from_numpy(y_age[:bs]), torch.from_numpy(y_gender[:bs])
    a = timed(lambda: step(xb, ya, yg), n_batches, bs)

    # (b) our loop: cache + albumentations + loader + step
    ds = FaceDataset(images, rows, y_age, y_gender, train_transform(TrainConfig(), 0))
    loader = make_loader(ds, bs, train=True, settings=LoaderSettings(workers=auto_workers(-1)))
    b = loop_speed(loader, lambda x, ya_, yg_: step(to_model_input(x, torch.device("cpu")), ya_, yg_), n_batches, bs)

    # (c) naive: PIL decode every epoch + torchvision transforms + DataLoader workers + NCHW float model
    naive_model = create_model(ModelConfig(name=args.model))
    set_trainable(naive_model, Unfreeze.parse("all"))
    naive_opt = torch.optim.AdamW(naive_model.parameters(), 1e-4)
    naive_loader = DataLoader(NaiveDataset(paths, args.size, True), bs, shuffle=True, num_workers=2)
    # the seeds' model takes normalised float NCHW input: bypass our in-model normalisation
    naive_step = step_fn(naive_model, naive_opt, lambda x: naive_model.heads(naive_model.backbone(x)))
    c = loop_speed(naive_loader, naive_step, n_batches, bs)

    print("\ntraining images/s")
    print(f"  (a) pure model step, batch in memory : {a:8.1f}")
    print(f"  (b) our pipeline loop                : {b:8.1f}")
    print(f"  (c) naive seed loop                  : {c:8.1f}")
    print(f"  b/a = {b / a:.3f}   (target >= 0.95)")
    print(f"  b/c = {b / c:.3f}   (target >= 1.3)")

    # inference with TTA (none + hflip)
    model.eval()
    with torch.inference_mode():
        ai = timed(lambda: (model(xb), model(xb.flip(3))), n_batches, bs)
    how = Inference(torch.device("cpu"), bs, precision=None, workers=auto_workers(-1), tta=("none", "hflip"))
    predict_arrays(model, images, rows[:bs], how)  # warm-up, as for (a)
    t0 = time.perf_counter()
    predict_arrays(model, images, rows, how)
    bi = len(rows) / (time.perf_counter() - t0)
    naive_model.eval()
    naive_eval = DataLoader(NaiveDataset(paths, args.size, False), bs * 2, shuffle=False, num_workers=2)
    t0, n = time.perf_counter(), 0
    with torch.inference_mode():
        for x, _, _ in naive_eval:
            naive_model.heads(naive_model.backbone(x))
            naive_model.heads(naive_model.backbone(x.flip(3)))
            n += len(x)
    ci = n / (time.perf_counter() - t0)
    print("\ninference images/s with TTA (2 views)")
    print(f"  (a) pure forward, batch in memory    : {ai:8.1f}")
    print(f"  (b) our predict_arrays               : {bi:8.1f}")
    print(f"  (c) naive seed loop                  : {ci:8.1f}")
    print(f"  b/a = {bi / ai:.3f}   b/c = {bi / ci:.3f}")

    # gradual unfreezing: seconds per epoch over these images, trunk cache included
    print("\nseconds per epoch over these images (frozen-trunk phases include computing their cache)")
    full = len(rows) / b
    print(f"  all (full fine-tuning)               : {full:8.2f}s")
    for what in ("head", "last:2", "last:3"):
        m, _ = fresh()
        unfreeze = Unfreeze.parse(what)
        set_trainable(m, unfreeze)
        o = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-4)
        t0 = time.perf_counter()
        store = TrunkStore(tempfile.mkdtemp(), images, TrainConfig(batch_size=bs))
        cache = TrunkCache(m, store, rows=(rows, rows[:0]), device=torch.device("cpu"))
        trunk = cache.for_phase(frozen_prefix_length(m, unfreeze), frozen_prefix_length(m, unfreeze))
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        for h, ya_, yg_ in trunk.batches(y_age, y_gender, bs, 0):
            age, logit = trunk.forward(m, h)
            loss = torch.nn.functional.smooth_l1_loss(age, ya_) + (
                torch.nn.functional.binary_cross_entropy_with_logits(logit, yg_)
            )
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
        per_epoch = time.perf_counter() - t0
        print(
            f"  {what:<6} epoch {per_epoch:6.2f}s (+{build:.2f}s once per phase): "
            f"{full / per_epoch:5.1f}x faster per epoch; with the cache counted, a 1-epoch phase "
            f"{full / (per_epoch + build):4.1f}x, a 3-epoch phase {3 * full / (3 * per_epoch + build):4.1f}x"
        )


if __name__ == "__main__":
    main()
