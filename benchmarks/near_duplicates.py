"""Near-duplicate groups (folds.groups: near_duplicates, pipeline/data/duplicates.py), before and after issue 32,
every figure measured in one run on the real UTKFace chips (by hand, not in CI; ~5 min on 2 cores):

1. time on all chips, no cache: the perceptual-hash rule of before (imagehash phash and average_hash of every file,
   joined at phash <= 2, or <= 6 with average_hash <= 2) against the detector now (duplicates.image_hashes);
2. the groups on all chips, before and after; the pairs the detector joins that the hashes did not (a random sample
   drawn as a contact sheet, --sheet, to be looked at) and the pairs the hashes joined that it does not (--split-sheet);
3. planted copies of random chips, added to all chips, by kind of change: found in their original's group, before
   and after;
4. the issue's setup: 400 chips plus 100 copies of some of them (zoomed 0.9-1.1, shifted up to 4 px, JPEG 60, a
   third grey): copies grouped with their original, and sharing its fold (5 folds, StratifiedGroupKFold).

    .venv/bin/python benchmarks/near_duplicates.py --root ../shared/data/utkface [--sheet PNG] [--split-sheet PNG]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import FoldsConfig  # noqa: E402
from pipeline.data import duplicates  # noqa: E402
from pipeline.data.competition import parse_utkface_name  # noqa: E402
from pipeline.data.folds import make_folds  # noqa: E402
from pipeline.data.imaging import WORKERS, decode_rgb, read_bytes  # noqa: E402

KINDS = ("shift", "zoom", "resize", "crop", "jpeg50", "grey", "rotate", "all")


# --- before: the hash rule (HASH_VERSION 2 of pipeline/data/duplicates.py) ---------------------------------------
def old_features(path: str) -> tuple[int, int, str]:
    img = decode_rgb(read_bytes(path))
    digest = hashlib.blake2b(img.tobytes(), digest_size=16)
    digest.update(str(img.shape).encode())
    pil = Image.fromarray(img)
    return int(str(imagehash.phash(pil)), 16), int(str(imagehash.average_hash(pil)), 16), digest.hexdigest()


def old_groups(phash: np.ndarray, mean: np.ndarray) -> np.ndarray:
    n, rows, cols = len(phash), [], []
    for i in range(0, n, 2048):
        bits = np.bitwise_count(phash[i : i + 2048, None] ^ phash[None, :])
        mean_bits = np.bitwise_count(mean[i : i + 2048, None] ^ mean[None, :])
        r, c = np.nonzero((bits <= 2) | ((bits <= 6) & (mean_bits <= 2)))
        keep = c > r + i
        rows.append(r[keep] + i)
        cols.append(c[keep])
    r, c = np.concatenate(rows), np.concatenate(cols)
    return connected_components(coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n)), directed=False)[1]


def old_all(paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with ThreadPoolExecutor(WORKERS) as pool:
        phash, mean, _ = zip(*pool.map(old_features, paths))
    phash, mean = np.array(phash, np.uint64), np.array(mean, np.uint64)
    return phash, mean, old_groups(phash, mean)


# --- planted copies -------------------------------------------------------------------------------------------------
def moved(img: np.ndarray, scale: float, dx: float, dy: float, angle: float = 0.0) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def plant(img: np.ndarray, kind: str, rng) -> tuple[np.ndarray, int]:
    """A copy of a BGR chip and its JPEG quality: shift (up to 3% of the width), zoom (0.85-1.15 in the same frame),
    resize (the whole picture to 0.85-1.15 of its size), crop (1-2% off each side), jpeg50, grey, rotate (1-5
    degrees: beyond the issue's range), all (zoom, shift, crop, grey and JPEG 50 at once), issue (the issue's own:
    zoom 0.9-1.1, shift up to 4 px, JPEG 60, a third grey)."""
    h, w = img.shape[:2]

    def shift(frac):
        angle, r = rng.uniform(0, 2 * np.pi), rng.uniform(0, frac) * w
        return r * np.cos(angle), r * np.sin(angle)

    def crop(x):
        left, right, top, bottom = np.maximum(1, np.round(rng.uniform(0.01, 0.02, 4) * w)).astype(int)
        return x[top:-bottom, left:-right]

    grey = lambda x: cv2.cvtColor(x, cv2.COLOR_BGR2GRAY)  # noqa: E731
    if kind == "shift":
        return moved(img, 1.0, *shift(0.03)), 90
    if kind == "zoom":
        return moved(img, 1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.15), 0, 0), 90
    if kind == "resize":
        s = rng.uniform(0.85, 1.15)
        return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA), 90
    if kind == "crop":
        return crop(img), 90
    if kind == "jpeg50":
        return img, 50
    if kind == "grey":
        return grey(img), 90
    if kind == "rotate":
        return moved(img, 1.0, 0, 0, rng.choice([-1, 1]) * rng.uniform(1, 5)), 90
    if kind == "all":
        return grey(crop(moved(img, rng.uniform(0.85, 1.15), *shift(0.03)))), 50
    assert kind == "issue"
    out = moved(img, rng.uniform(0.9, 1.1), *rng.integers(-4, 5, 2))
    return (grey(out) if rng.random() < 1 / 3 else out), 60


def write_copies(paths: list[str], kinds: list[str], folder: Path, seed: int) -> list[str]:
    rng, out = np.random.default_rng(seed), []
    for n, (path, kind) in enumerate(zip(paths, kinds)):
        copy, quality = plant(cv2.imread(path), kind, rng)
        out.append(str(folder / f"copy{n:04d}_{kind}.jpg"))
        cv2.imwrite(out[-1], copy, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return out


# --- after: the detector's parts, on decoded thumbnails -------------------------------------------------------------
def thumbs_of(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with ThreadPoolExecutor(WORKERS) as pool:
        thumbs, digests = zip(*pool.map(duplicates._read, paths))
    return np.stack(thumbs), np.array(digests)


def summary(groups: np.ndarray) -> str:
    sizes = pd.Series(groups).value_counts()
    multi = sizes[sizes > 1]
    return f"{len(multi):,} groups holding {int(multi.sum()):,} images (the largest {int(multi.max())})"


def contact_sheet(paths: list[str], pairs: list[tuple[int, int]], labels: list[str], out: str, cols: int = 5) -> None:
    """Each pair side by side (64 px each) over its label; a 256-colour PNG to stay small."""
    size, tiles = 64, []
    for (i, j), label in zip(pairs, labels):
        tile = np.full((size + 14, 2 * size + 8, 3), 255, np.uint8)
        tile[:size, :size] = cv2.resize(cv2.imread(paths[i]), (size, size), interpolation=cv2.INTER_AREA)
        tile[:size, size + 2 : 2 * size + 2] = cv2.resize(
            cv2.imread(paths[j]), (size, size), interpolation=cv2.INTER_AREA
        )
        cv2.putText(tile, label, (1, size + 11), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1)
        tiles.append(tile)
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.concatenate([np.concatenate(tiles[r : r + cols], 1) for r in range(0, len(tiles), cols)], 0)
    Image.fromarray(cv2.cvtColor(grid, cv2.COLOR_BGR2RGB)).quantize(256).save(out, optimize=True)
    print(f"  contact sheet: {out} ({os.path.getsize(out) / 1024:.0f} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/utkface")
    ap.add_argument("--per-kind", type=int, default=100, help="planted copies of each kind")
    ap.add_argument("--sample", type=int, default=50, help="newly joined pairs drawn on the contact sheet")
    ap.add_argument("--sheet", default="", help="PNG of the sampled newly joined pairs")
    ap.add_argument("--split-sheet", default="", help="PNG of pairs the hashes joined and the detector does not")
    ap.add_argument("--pairs-csv", default="", help="CSV of the sampled pairs (both sheets), to look at them larger")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    paths = sorted(str(p) for p in Path(args.root).iterdir() if parse_utkface_name(p.name))
    n = len(paths)
    print(f"{n:,} chips in {args.root}; {os.cpu_count()} CPUs, {WORKERS} decoding threads")

    print("\n1. Time on all chips, no cache")
    t = time.perf_counter()
    phash, mean, before = old_all(paths)
    t_before = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        after = duplicates.image_hashes(paths, cache).groups
        t_after = time.perf_counter() - t
        t = time.perf_counter()
        duplicates.image_hashes(paths, cache)
        t_cached = time.perf_counter() - t
    print(
        f"  before (hashes): {t_before:.1f} s; after (index and registration): {t_after:.1f} s; "
        f"ratio {t_after / t_before:.2f}; then {t_cached:.1f} s a load from the cache"
    )

    print("\n2. Groups on all chips")
    print(f"  all chips, before: {summary(before)}\n  all chips, after:  {summary(after)}")
    thumbs, digests = thumbs_of(paths)
    train = pd.DataFrame([parse_utkface_name(Path(p).name)[:2] for p in paths], columns=["age", "gender"])
    noise = [i for rows in duplicates.label_conflicts(train, duplicates.Hashes(digests, after)) for i in rows]
    kept = np.setdiff1d(np.arange(n), noise)
    print(f"  as the data report counts them, without the {len(noise)} rows of pictures labelled two ways:")
    print(f"    before: {summary(before[kept])}\n    after:  {summary(after[kept])}")
    t = time.perf_counter()
    pairs = duplicates.candidate_pairs(thumbs, digests != "")
    t_index = time.perf_counter() - t
    scores = duplicates.same_picture_scores(thumbs, pairs)
    t_checks = time.perf_counter() - t - t_index
    print(
        f"  detector: {len(pairs):,} candidate pairs ({t_index:.1f} s), checked in {t_checks:.1f} s; "
        f"{int((scores >= duplicates.SAME_PICTURE).sum()):,} at >= {duplicates.SAME_PICTURE}"
    )
    bins = [-1, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.01]
    hist = np.histogram(scores, bins)[0]
    print(
        "  scores of the candidate pairs: "
        + ", ".join(f"[{a:g}, {b:g}) {c:,}" for a, b, c in zip(bins, bins[1:], hist))
    )
    joined = pairs[scores >= duplicates.SAME_PICTURE][:, :2].astype(int)
    new = joined[before[joined[:, 0]] != before[joined[:, 1]]]
    moved_images = np.unique(new)
    print(f"  newly joined: {len(new):,} pairs the hashes left apart ({len(moved_images):,} images)")
    lost = [
        (i, j)
        for g in np.unique(before)
        for members in [np.nonzero(before == g)[0]]
        if len(members) > 1
        for i, j in zip(members[:-1], members[1:])
        if after[i] != after[j]
    ]
    print(f"  split: {len(lost):,} pairs of images the hashes joined are in different groups now")
    rng = np.random.default_rng(args.seed)
    score_of = dict(zip(map(tuple, pairs[:, :2].astype(int)), scores))
    sampled = []
    if len(new):
        pick = np.sort(rng.choice(len(new), min(args.sample, len(new)), replace=False))
        labels = [f"{k + 1}: {score_of[tuple(new[k])]:.3f}" for k in pick]
        sampled += [("joined", label, paths[new[k][0]], paths[new[k][1]]) for k, label in zip(pick, labels)]
        if args.sheet:
            contact_sheet(paths, [tuple(new[k]) for k in pick], labels, args.sheet)
    if lost:
        pick = np.sort(rng.choice(len(lost), min(args.sample, len(lost)), replace=False))
        labels = [f"{k + 1}: phash {int(np.bitwise_count(phash[lost[k][0]] ^ phash[lost[k][1]]))}" for k in pick]
        sampled += [("split", label, paths[lost[k][0]], paths[lost[k][1]]) for k, label in zip(pick, labels)]
        if args.split_sheet:
            contact_sheet(paths, [lost[k] for k in pick], labels, args.split_sheet)
    if args.pairs_csv:
        pd.DataFrame(sampled, columns=["kind", "label", "first", "second"]).to_csv(args.pairs_csv, index=False)

    print(f"\n3. Planted copies ({args.per_kind} of each kind, of random chips), added to all chips")
    kinds = [k for k in KINDS for _ in range(args.per_kind)]
    originals = rng.choice(n, len(kinds), replace=False)
    with tempfile.TemporaryDirectory() as folder:
        copies = write_copies([paths[i] for i in originals], kinds, Path(folder), args.seed)
        c_phash, c_mean, _ = old_all(copies)
        before_p = old_groups(np.concatenate([phash, c_phash]), np.concatenate([mean, c_mean]))
        c_thumbs, c_digests = thumbs_of(copies)
    after_p = duplicates.near_duplicate_groups(np.concatenate([thumbs, c_thumbs]), np.concatenate([digests, c_digests]))
    rows = []
    for kind in KINDS:
        k = np.array([x == kind for x in kinds])
        c = n + np.nonzero(k)[0]
        rows.append(
            (kind, np.mean(before_p[c] == before_p[originals[k]]), np.mean(after_p[c] == after_p[originals[k]]))
        )
    for kind, b, a in rows:
        print(f"  {kind:7s} before {b:.2f}  after {a:.2f}")

    print("\n4. The issue's setup: 400 chips plus 100 copies of 100 of them")
    chips = rng.choice(n, 400, replace=False)
    with tempfile.TemporaryDirectory() as folder:
        copies = write_copies([paths[i] for i in chips[:100]], ["issue"] * 100, Path(folder), args.seed + 1)
        files = [paths[i] for i in chips] + copies
        _, _, before_i = old_all(files)
        after_i = duplicates.near_duplicate_groups(*thumbs_of(files))
    ages, genders, _ = zip(*(parse_utkface_name(Path(paths[i]).name) for i in chips))
    train = pd.DataFrame({"id": range(500), "age": ages + ages[:100], "gender": genders + genders[:100]})
    bins = FoldsConfig().age_bins
    for name, groups in (("before", before_i), ("after", after_i)):
        grouped = int(np.sum(groups[400:] == groups[:100]))
        folds = make_folds(train.assign(fold_group=groups), 5, 42, bins).fold.to_numpy()
        same = int(np.sum(folds[400:] == folds[:100]))
        print(f"  {name}: {grouped} of 100 copies grouped with their original; {same} of 100 share its fold")
    folds = make_folds(train, 5, 42, bins).fold.to_numpy()
    print(f"  no groups: {int(np.sum(folds[400:] == folds[:100]))} of 100 share the original's fold (chance: ~20)")


if __name__ == "__main__":
    main()
