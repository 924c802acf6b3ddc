"""Images/s of a bundle's predict (resize + every fold model x TTA + blend) with torch and with onnxruntime,
one run each, on 96 px face crops; optionally the run's held-out figures recomputed from the bundle.

    .venv/bin/python benchmarks/bundle_speed.py                       # runs/utkface_cpu if blended
    .venv/bin/python benchmarks/bundle_speed.py --holdout             # + held-out check (needs the data)

Without a blended run the bundles hold freshly initialised models of the config's architectures (speed does not
depend on the weights). Note the load average: timings taken on a busy machine are not comparable."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import Config, ModelConfig, load_config  # noqa: E402
from pipeline.core.cores import usable_cores  # noqa: E402
from pipeline.core.layout import BlendFile  # noqa: E402
from pipeline.data.cache import decode_image  # noqa: E402
from pipeline.exporting.export import (  # noqa: E402
    FoldState,
    ModelFolds,
    bundle_info,
    export,
    holdout_from_bundle,
    write_bundle,
)
from pipeline.exporting.torch_runtime import load_bundle  # noqa: E402
from pipeline.models.backbones import create_model  # noqa: E402


def fresh_bundles(cfg: Config, out: Path) -> dict[str, Path]:
    """torch and onnx bundles of randomly initialised models with the config's architectures and folds."""
    members = []
    for m in cfg.models:
        resolved = ModelConfig.from_inference_spec(m.inference_spec(cfg.img_size(m)))
        state = {k: v.contiguous() for k, v in create_model(resolved, load_weights=False).state_dict().items()}
        members.append(ModelFolds(resolved, [FoldState(k, state, 33.0, 20.0) for k in range(cfg.folds.n_splits)]))
    weights = {m.name: 1 / len(cfg.models) for m in cfg.models}
    blend = BlendFile.of_weights(weights, weights, threshold=0.5)
    paths = {}
    for fmt in ("torch", "onnx"):
        info = bundle_info(cfg, out, blend, members, fmt)
        write_bundle(members, info, out / f"bundle-{fmt}", f"fresh-{fmt}")
        paths[fmt] = out / f"bundle-{fmt}"
    return paths


def faces_96(data: Path, n: int) -> list[np.ndarray]:
    files = sorted(data.glob("*.jpg"))[:n] if data.is_dir() else []
    if len(files) == n:
        return [decode_image(str(p), 96, "center_crop") for p in files]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(n)]


def images_per_s(path: Path, faces: list[np.ndarray], batch_size: int, parallel: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    bundle = load_bundle(path, parallel_folds=parallel)
    load_s = time.perf_counter() - t0
    bundle.predict(faces[:batch_size], batch_size)  # warm-up: first-call allocations, oneDNN kernels
    t0 = time.perf_counter()
    bundle.predict(faces, batch_size)
    return len(faces) / (time.perf_counter() - t0), load_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/utkface_cpu.yaml")
    ap.add_argument("--experiment", default="utkface_cpu")
    ap.add_argument("--data", default="../shared/data/utkface")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--holdout", action="store_true", help="recompute the run's held-out figures from the bundle")
    ap.add_argument("--keep", default="", help="fresh models: write their bundles here and reuse them next time")
    args = ap.parse_args()

    exp_dir = Path("runs") / args.experiment
    trained = (exp_dir / "blend.json").is_file()
    tmp = tempfile.TemporaryDirectory()
    if trained:
        cfg = load_config(exp_dir / "config.yaml", [f"data.root={args.data}"])
        paths = {fmt: exp_dir / ("bundle" if fmt == "torch" else "bundle-onnx") for fmt in ("torch", "onnx")}
        for fmt, path in paths.items():
            if not (path / "bundle.json").is_file():
                t0 = time.perf_counter()
                export(cfg, exp_dir, fmt)
                print(f"exported {fmt} bundle in {time.perf_counter() - t0:.0f}s")
        print(f"bundles of the trained run {exp_dir}")
    else:
        cfg = load_config(args.config)
        out = Path(args.keep or tmp.name)
        paths = {fmt: out / f"bundle-{fmt}" for fmt in ("torch", "onnx")}
        if not all((p / "bundle.json").is_file() for p in paths.values()):
            paths = fresh_bundles(cfg, out)
        print(f"{exp_dir} has no blend.json: freshly initialised models of {args.config}")
    models = ", ".join(f"{m.name} {cfg.img_size(m)}px" for m in cfg.models)
    print(f"ensemble: {models}; {cfg.folds.n_splits} folds; TTA {cfg.tta}; {usable_cores()} cores")

    faces = faces_96(Path(args.data), args.n)
    speed = {}
    runs = {"torch": ("torch", True), "onnx": ("onnx", True), "onnx, one model at a time": ("onnx", False)}
    for name, (fmt, parallel) in runs.items():
        load1 = os.getloadavg()[0]
        speed[name], load_s = images_per_s(paths[fmt], faces, args.batch_size, parallel)
        print(
            f"{name:>26}: {speed[name]:6.1f} images/s predict on {len(faces)} 96px crops "
            f"(bundle load {load_s:.1f}s; load average {load1:.2f} -> {os.getloadavg()[0]:.2f})"
        )
    print(f"onnxruntime / torch: {speed['onnx'] / speed['torch']:.2f}x")

    if args.holdout:
        if not trained:
            print("held-out check skipped: no blended run")
            return
        own = json.loads((exp_dir / "blend.json").read_text()).get("holdout")
        for fmt, path in paths.items():
            t0 = time.perf_counter()
            got = holdout_from_bundle(load_bundle(path), cfg)
            diff = max(abs(got[k] - own[k]) for k in own)
            print(f"held-out from the {fmt} bundle ({time.perf_counter() - t0:.0f}s): max |difference| {diff:.2g}")
            print("  bundle: " + ", ".join(f"{k} {v:.4f}" for k, v in got.items()))
            print("  run:    " + ", ".join(f"{k} {v:.4f}" for k, v in own.items()))


if __name__ == "__main__":
    main()
