"""What does `data.face_crop: detect` cost when the image cache is built, and how much does it change UTKFace chips?

Builds the pipeline's own cache (`cached_images`) of N chips twice in a scratch folder, plain and with
face_crop=detect (YuNet in a process pool, then the eye-aligned crop and resize in the decode threads), and prints
images/s of each, their ratio, how many chips had no face (kept whole) and the mean absolute pixel difference
between the two caches at --size px. --compare M also times the detection alone on M chips one image at a time,
in a thread pool and in a process pool (detect_all uses processes, one OpenCV thread each).

    .venv/bin/python benchmarks/face_crop_speed.py --data ../shared/data/utkface [--n 2000] [--size 96]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data import cache as data  # noqa: E402
from pipeline.data import faces as face_module  # noqa: E402
from pipeline.data.faces import CHIP_SIZE, chip_frame  # noqa: E402


def chips(folder: str, n: int, seed: int) -> list[str]:
    paths = sorted(str(p) for p in Path(folder).iterdir() if p.name.endswith(".jpg"))
    if 0 < n < len(paths):
        keep = np.random.default_rng(seed).choice(len(paths), n, replace=False)
        paths = [paths[i] for i in sorted(keep)]
    return paths


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the process pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def serial(paths: list[str]) -> list:
    return [face_module.best_face(p) for p in paths]


def threads(paths: list[str]) -> list:
    with ThreadPoolExecutor(data.WORKERS) as pool:
        return list(pool.map(face_module.best_face, paths))


def processes(paths: list[str]) -> list:
    face_module.DETECT_POOL_FROM = 0
    return face_module.detect_all(paths, "detect (process pool)")


def compare(paths: list[str]) -> None:
    """Wall-clock images/s and cores kept busy (CPU seconds / wall seconds) of each way to run the detection."""
    print(f"detection alone on {len(paths)} chips, {data.WORKERS} workers:")
    results = []
    for name, fn in (("one image at a time", serial), ("thread pool", threads), ("process pool", processes)):
        cpu = cpu_seconds()
        found, dt = timed(fn, paths)
        results.append(found)
        print(f"  {name:<20} {len(paths) / dt:8.1f} images/s, {(cpu_seconds() - cpu) / dt:.2f} cores busy")
    print(f"  same faces in every mode: {results[0] == results[1] == results[2]} (process pool: with its start-up)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/utkface")
    ap.add_argument("--n", type=int, default=2000, help="chips to time (0 = all)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--compare", type=int, default=0, help="also time detection modes on this many chips")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=data.WORKERS, help="decode threads and detection processes")
    args = ap.parse_args()
    data.WORKERS = face_module.WORKERS = args.workers
    paths = chips(args.data, args.n, args.seed)
    if args.compare:
        compare(paths[: args.compare])
    with tempfile.TemporaryDirectory() as tmp:
        (plain, _, _), t_plain = timed(data.cached_images, paths, args.size, tmp, "plain")
        (crop, ok, _), t_crop = timed(data.cached_images, paths, args.size, tmp, "crop", "stretch", "detect")
        faces = data.find_faces(paths, tmp, "crop")
        no_face = [p for p, f, good in zip(paths, faces, ok) if good and f is None]
        found = np.array([f is not None for f in faces])
        diff = np.abs(np.asarray(crop, np.int16) - np.asarray(plain, np.int16)).mean(axis=(1, 2, 3))
    print(f"{len(paths)} chips at {args.size} px, {data.WORKERS} workers")
    print(f"  plain decode:            {len(paths) / t_plain:8.1f} images/s ({t_plain:.1f} s)")
    print(f"  face_crop=detect decode: {len(paths) / t_crop:8.1f} images/s ({t_crop:.1f} s)")
    print(f"  ratio (detect time / plain time): {t_crop / t_plain:.1f}x")
    print(f"  no face found (kept whole): {len(no_face)} of {int(ok.sum())} readable chips")
    for p in no_face[:20]:
        print(f"    {Path(p).name}")
    shifted = np.abs(np.asarray(plain[:, :, 2:], np.int16) - np.asarray(plain[:, :, :-2], np.int16)).mean()
    print(f"  mean |detect - plain| per pixel (0-255): {diff.mean():.2f} over all chips")
    print(
        f"    over the cropped ones: mean {diff[found].mean():.2f}, median {np.median(diff[found]):.2f}, "
        f"95th percentile {np.percentile(diff[found], 95):.2f}; the plain cache against itself moved by 2 px: "
        f"{shifted:.2f}"
    )
    frame_stats([f for f in faces if f is not None])


def frame_stats(found: list) -> None:
    """Where the crops sit on the 200 x 200 chips: side, centre offset from the chip's centre, eye-line angle."""
    frames = [chip_frame(f) for f in found]
    side = np.array([s for _, s, _ in frames])
    offset = np.array([np.hypot(*(c - CHIP_SIZE / 2)) for c, _, _ in frames])
    angle = np.abs(np.degrees([a for _, _, a in frames]))
    print(
        f"  crop on the chip (medians): side {np.median(side):.1f} px (5-95%: {np.percentile(side, 5):.0f}-"
        f"{np.percentile(side, 95):.0f}), centre {np.median(offset):.1f} px off the chip's, "
        f"eye line tilted {np.median(angle):.1f} degrees"
    )


if __name__ == "__main__":
    main()
