"""The GPU check: one command for anyone with a GPU (and for us, when one is lent). It trains a small real recipe
(a head, a last:1 and an `all` phase of two epochs, the frozen-trunk cache on) in each precision train.amp offers,
and compiled, and prints per run the images/s of each phase and of the frozen-trunk store and the peak memory;
then checks that the device's predictions agree with the CPU's fp32 ones within the tolerances below, and that a
T4-class GPU (bf16 only emulated, as on Kaggle's T4) gets fp16 from train.amp=auto.

Without CUDA it runs the same to the end on CPU (CPU autocast in bf16 and fp16, the gradient scaler, compile),
skips what needs a GPU and says so; CI runs it that way (tests/test_gpu_check.py), so it is known to work.
Speed and agreement only: the weights are timm's random init (no quality figure comes out of this).

    .venv/bin/python benchmarks/gpu_check.py [--data ../shared/data/utkface] [--model tf_efficientnet_lite0]
        [--size 128] [--images 512] [--batch 32] [--no-compile]

Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import Config, DataConfig, ModelConfig, Phase, TrainConfig, Unfreeze  # noqa: E402
from pipeline.core.tracking import Tracker  # noqa: E402
from pipeline.data.cache import prepare_images  # noqa: E402
from pipeline.data.competition import load_competition  # noqa: E402
from pipeline.data.demo import make_demo  # noqa: E402
from pipeline.inference.predict import load_best  # noqa: E402
from pipeline.models.backbones import create_model  # noqa: E402
from pipeline.models.stages import frozen_prefix_length, set_trainable  # noqa: E402
from pipeline.training.evaluation import AgeUnits, predict_arrays  # noqa: E402
from pipeline.training.job import FoldJob, Inference, amp_dtype  # noqa: E402
from pipeline.training.train import train_fold  # noqa: E402
from pipeline.training.trunk import TrunkCache, TrunkStore  # noqa: E402

# two epochs a phase: its speed is the second's (the first includes cuDNN autotuning and torch.compile's compile)
PHASES = [Phase(2, "head", 3e-3), Phase(2, "last:1", 1e-3), Phase(2, "all", 5e-4)]
# Largest difference from the CPU's fp32 predictions allowed: (years of age, gender probability)
TOLERANCE = {"off": (0.1, 0.01), "bf16": (1.0, 0.05), "fp16": (0.5, 0.03)}  # "off" on CUDA: TF32 matmuls
CPU = torch.device("cpu")


def competition(args, work: Path):
    """The images (demo faces, or --data) decoded once at --size, --images of them, and 4 folds."""
    root = Path(args.data) if args.data else make_demo(work / "demo", n_train=args.images, n_test=8)
    cfg = Config(data=DataConfig(root=str(root), img_size=args.size, cache_dir=str(work / "images")))
    with contextlib.redirect_stdout(io.StringIO()):
        comp = load_competition(cfg)
        comp = replace(comp, train=comp.train.iloc[: args.images].reset_index(drop=True), test=comp.test.iloc[:8])
        comp, images = prepare_images(comp, cfg, args.size)
    folds = pd.DataFrame({"id": comp.train.id, "fold": np.arange(len(comp.train)) % 4})
    return comp, images, folds


def train_run(args, data, device: torch.device, amp: str, compiled: bool, work: Path) -> dict:
    """Fold 0 of the recipe on `device` in precision `amp`: img/s per phase and of the trunk store, peak memory."""
    comp, images, folds = data
    name = f"{device.type}-{amp}{'-compiled' if compiled else ''}"
    model = ModelConfig(name=args.model, pretrained=False, phases=PHASES)
    train = TrainConfig(batch_size=args.batch, amp=amp, compile=compiled, device=device.type, ema=0.0)
    cfg = Config(data=DataConfig(img_size=args.size, cache_dir=str(work / name / "cache")), models=[model], train=train)
    tracker = Tracker(cfg, name, "train", work, enabled=False)
    job = FoldJob(cfg, model, 0, comp, images, folds, work / name / "fold0", device, tracker)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        train_fold(job)
    metrics = pd.read_csv(job.out / "metrics.csv")
    speeds = metrics.groupby("train", sort=False).img_per_s.last().to_dict()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"run": name, "job": job, **speeds, "store": store_speed(job), "peak_mb": peak and peak / 2**20}


def store_speed(job: FoldJob) -> float:
    """images/s of the frozen-trunk store's pass (the trunk below a head phase, every training image, one view)."""
    model = create_model(replace(job.model, img_size=job.cfg.img_size(job.model))).to(job.device)
    model = model.to(memory_format=torch.channels_last)
    unfreeze = Unfreeze.parse("head")
    set_trainable(model, unfreeze)
    rows = np.arange(len(job.images.train))
    store = TrunkStore(tempfile.mkdtemp(dir=job.out.parent), job.images.train, job.cfg.train, job.precision)
    cache = TrunkCache(model, store, rows=(rows, rows[:0]), device=job.device)
    k = frozen_prefix_length(model, unfreeze)
    cache._run(rows[: job.cfg.train.batch_size], k, 0)  # warm-up
    sync(job.device)
    t0 = time.perf_counter()
    cache._run(rows, k, 0)
    sync(job.device)
    return len(rows) / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(reference: FoldJob, device: torch.device, amp: str) -> tuple[float, float]:
    """Largest |age| and |gender probability| differences of the reference fold's model predicting its validation
    images on `device` in precision `amp` against the same on CPU in fp32."""
    _, va = reference.rows()
    out = []
    for dev, mode in [(CPU, "off"), (device, amp)]:
        model, ckpt = load_best(reference.out / "best.pt", reference.model, dev, channels_last=True)
        how = Inference(dev, reference.cfg.train.batch_size * 2, amp_dtype(mode, dev), 0, ("none", "hflip"))
        out.append(predict_arrays(model, reference.images.train, va, how, AgeUnits.of(ckpt)))
    (age0, p0), (age1, p1) = out
    return float(np.abs(age0 - age1).max()), float(np.abs(p0 - p1).max())


def t4_gets_fp16() -> bool:
    """train.amp=auto on a GPU whose bf16 is only emulated (T4) is fp16, and bf16 on one that has it."""
    real = torch.cuda.is_bf16_supported
    try:
        torch.cuda.is_bf16_supported = lambda including_emulation=True: including_emulation
        t4 = amp_dtype("auto", torch.device("cuda"))
        torch.cuda.is_bf16_supported = lambda including_emulation=True: True
        a100 = amp_dtype("auto", torch.device("cuda"))
    finally:
        torch.cuda.is_bf16_supported = real
    return t4 == torch.float16 and a100 == torch.bfloat16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="", help="a competition folder (default: the demo faces)")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled run")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else CPU
    gpu = torch.cuda.get_device_name(device) if cuda else "no CUDA device: the CPU runs the same path"
    print(f"{args.model} at {args.size}px, batch {args.batch}, {args.images} images, torch {torch.__version__}; {gpu}")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    data = competition(args, work)
    modes = ["off", "bf16", "fp16"]
    if cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        print("  this GPU has no native bf16 (bf16 is emulated): skipping the bf16 run")
        modes.remove("bf16")
    plan = [(m, False) for m in modes] + ([] if args.no_compile else [("auto" if cuda else "off", True)])
    runs = [train_run(args, data, device, amp, compiled, work) for amp, compiled in plan]
    print(f"\n{'run':<20} {'head':>8} {'last:1':>8} {'all':>8} {'store':>8} {'peak MB':>8}   (images/s)")
    for r in runs:
        peak = f"{r['peak_mb']:8.0f}" if r["peak_mb"] else f"{'-':>8}"
        speeds = " ".join(f"{r.get(p.train, float('nan')):8.1f}" for p in PHASES)
        print(f"{r['run']:<20} {speeds} {r['store']:8.1f} {peak}")
    if not cuda:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"(CPU: no per-run peak; the process's peak resident memory was {rss:.0f} MB)")

    failed = []
    reference = runs[0]["job"]  # the "off" run: its best.pt predicted on the CPU and on the device
    print("\nagreement with the CPU's fp32 predictions (largest difference over the validation images, TTA none+hflip)")
    for amp in modes if cuda else ["bf16", "fp16"]:
        d_age, d_prob = agreement(reference, device, amp)
        tol_age, tol_prob = TOLERANCE[amp]
        ok = d_age <= tol_age and d_prob <= tol_prob
        failed += [] if ok else [f"{device.type} {amp} agreement"]
        print(
            f"  {device.type} {amp:<5}: age {d_age:.4f} years (<= {tol_age}), gender prob {d_prob:.5f} "
            f"(<= {tol_prob})  {'ok' if ok else 'FAILED'}"
        )
    if not cuda:
        print("  CUDA against CPU: skipped, no CUDA device (the rows above are CPU autocast against CPU fp32)")
    ok = t4_gets_fp16()
    failed += [] if ok else ["T4 precision"]
    verdict = "ok" if ok else "FAILED"
    print(f"\na T4-class GPU (bf16 emulated) gets fp16 + a gradient scaler from train.amp=auto: {verdict}")
    if cuda:
        print(f"  this GPU gets {amp_dtype('auto', device)} from train.amp=auto")
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
