"""Duplicate and same-person groups (folds.groups), so that no copy of a photo (re-encoded, resized, re-cropped,
shifted, greyed, renamed) and no person is on both sides of a fold or of the hold-out split; and copies with the same
pixels but other labels, which are label noise.

A copy is found as a person would find it (issue 32): every image becomes a small greyscale copy; a cheap index
proposes, for each image looked up at three zooms, its nearest images; each proposed pair is then registered (a
search over scale and shift, then OpenCV's ECC) and kept only when the fine detail of the two pictures matches:
"these are the same picture". Perceptual hashes cannot do both: aligned faces sit close in hash space, and a shift
of 2% or a zoom of 10% moves a hash as far as another face (docs/RESULTS.md, "Duplicates in UTKFace")."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from ..core.errors import DataError
from ..core.files import atomic_path
from .imaging import WORKERS, decode_rgb, files_key, read_bytes

HASH_VERSION = 3  # 3: groups from registered pixels (issue 32); 2: from perceptual hashes, stored with them

# Every threshold of the detector, with the measurement that chose it: benchmarks/near_duplicates.py on UTKFace's
# 21,351 chips plus 800 planted copies (shifted up to 3%, zoomed 0.85-1.15, resized, 1-2% border crops, JPEG 50,
# greyed, and all at once); docs/RESULTS.md, "Duplicates in UTKFace".
SIDE = 64  # images are compared as SIDE x SIDE greyscale copies (colour is not compared: a greyed copy is a copy)
# The index: 12 x 12 copies, zero-mean and unit-norm (a dot product is their normalised cross-correlation); each
# image is looked up zoomed by ZOOMS (a copy rescaled by 0.85-1.15 is then within 5% of one lookup), and each lookup
# proposes its NEIGHBOURS nearest images whose cosine is at least MIN_COSINE. Measured: every planted copy was its
# original's first or second neighbour at one zoom, with a cosine >= 0.90; UTKFace then gives 37,624 pairs to check.
# One zoom (1.0) alone missed 3% of the copies (those zoomed by 10-15%); 16 x 16 or a high-pass index ranked
# copies lower, 8 x 8 proposed more pairs for the same recall.
INDEX_SIDE, ZOOMS, NEIGHBOURS, MIN_COSINE = 12, (0.9, 1.0, 1.1), 2, 0.85
# Check 1, coarse: at 32 x 32, the high-pass (less a Gaussian blur of COARSE_SIGMA px) of one image zoomed by
# zoom / COARSE_STEP, zoom and zoom * COARSE_STEP, the other's centre matched over every shift (cv2.matchTemplate,
# normalised). Planted copies scored >= 0.65 (turned ones the lowest), and 3 of 4 UTKFace candidates score below
# COARSE_MIN, so the fine check runs on a quarter of the pairs.
COARSE_SIDE, COARSE_SIGMA, COARSE_STEP, COARSE_MIN = 32, 1.5, 1.05, 0.6
# Check 2, fine: at SIDE, from check 1's scale and shift, OpenCV's ECC registration (cv2.findTransformECC, an
# affine warp: scale, shift, a small turn or stretch, as copies of aligned chips often have) of the two images'
# high-passes (the image less its Gaussian blur of HIGH_PASS_SIGMA px: the edges that make a photo that photo, not the
# layout every aligned face shares), then their correlation over the centre (MARGIN px in from each side, where no
# shifted or zoomed-out border lands). Pairs scoring at least SAME_PICTURE are one picture. Measured: the planted
# copies scored >= 0.97, and 100 turned by 1-5 degrees all >= 0.9 (a search over scale and shift alone found under
# half of those); UTKFace's 37,624 candidates thin out to 29 at 0.85-0.90 (looked at: half one photo, half two photos
# of one person) and 41 at 0.90-0.95 (all one photo), then 930 above. The correlation of the plain images (not
# high-passed) had no such gap. A picture whose detail lies in few places (fewer than DETAILED_TILES of the centre's
# 3 x 3 tiles with a high-pass spread of DETAIL grey levels: a plain wall, one edge across a smooth surface) is not
# compared, as any two such pictures can be warped onto each other; its exact copies still join by their pixels. The
# planted copies and the sampled UTKFace candidates had 8 or 9 such tiles; two crops of scikit-image's retina photo,
# joined before this rule, 3.
HIGH_PASS_SIGMA, MARGIN, SAME_PICTURE, DETAIL, DETAILED_TILES = 3.0, 8, 0.9, 2.0, 5
ECC_STOP = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 1e-4)  # iterations, or a step under 1e-4
CELLS = 1 << 25  # cells of the index's similarity matrix computed at once (128 MB)


@dataclass
class Hashes:
    pixels: np.ndarray  # str: digest of the decoded pixels ("" for an unreadable file)
    groups: np.ndarray  # near_duplicate_groups of the files (image_hashes stores them alongside)


def image_hashes(paths: list[str], cache_dir: str) -> Hashes:
    """Every file's pixel digest and near-duplicate group, computed once (decoding each file, then the index and
    the checks: 35-40 s for 21k images on 2 cores) and kept in cache_dir."""
    store = Path(cache_dir) / f"hashes-{files_key(f'hashes-v{HASH_VERSION}', paths)}.npz"
    if store.is_file():
        with np.load(store) as z:
            return Hashes(z["pixels"], z["groups"])
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(tqdm(pool.map(_read, paths), total=len(paths), desc="image hashes", unit="img", disable=None))
    thumbs = np.stack([t for t, _ in done]) if done else np.zeros((0, SIDE, SIDE), np.uint8)
    hashes = Hashes(np.array([d for _, d in done], str), np.zeros(0, int))
    hashes.groups = near_duplicate_groups(thumbs, hashes.pixels)
    store.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(store) as tmp, open(tmp, "wb") as f:
        np.savez(f, pixels=hashes.pixels, groups=hashes.groups)
    return hashes


def _read(path: str) -> tuple[np.ndarray, str]:
    """The file's SIDE x SIDE greyscale copy and the digest of its decoded pixels."""
    try:
        img = decode_rgb(read_bytes(path))
    except DataError:
        return np.zeros((SIDE, SIDE), np.uint8), ""  # unreadable: the image cache reports it and skips the row
    digest = hashlib.blake2b(img.tobytes(), digest_size=16)
    digest.update(str(img.shape).encode())
    return thumbnail(img), digest.hexdigest()


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """An RGB image as the SIDE x SIDE greyscale copy the detector compares (stretched if not square)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def near_duplicate_groups(thumbs: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """A group id per image (thumbs: N x SIDE x SIDE uint8 from thumbnail(); pixels: their digests, "" for an
    unreadable file, which stays alone): images joined when they are the same picture (same_picture_scores) or
    have the same pixels, and whatever joins them in a chain."""
    n = len(thumbs)
    readable = pixels != ""
    pairs = candidate_pairs(thumbs, readable)
    scores = same_picture_scores(thumbs, pairs)
    same = pairs[scores >= SAME_PICTURE]
    rows, cols = [same[:, 0].astype(np.int64)], [same[:, 1].astype(np.int64)]
    frame = pd.DataFrame({"pixels": pixels, "row": np.arange(n)})[readable]
    first = frame.groupby("pixels").row.transform("first").to_numpy()
    rows.append(frame.row.to_numpy())
    cols.append(first)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _zoom(img: np.ndarray, scale: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """img magnified by `scale` about its centre, then moved by (dx, dy) pixels; the border repeated."""
    n = img.shape[0]
    c = (n - 1) / 2
    m = np.array([[scale, 0, (1 - scale) * c + dx], [0, scale, (1 - scale) * c + dy]], np.float32)
    return cv2.warpAffine(img, m, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _index_rows(thumbs: np.ndarray, readable: np.ndarray) -> np.ndarray:
    """INDEX_SIDE x INDEX_SIDE copies as zero-mean unit-norm rows (all zero for a flat or unreadable image)."""
    small = [cv2.resize(t, (INDEX_SIDE, INDEX_SIDE), interpolation=cv2.INTER_AREA) for t in thumbs]
    rows = np.stack(small).reshape(len(thumbs), -1).astype(np.float32) if len(small) else np.zeros((0, 1), np.float32)
    rows -= rows.mean(1, keepdims=True)
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = np.divide(rows, norm, out=np.zeros_like(rows), where=norm > 1e-3)
    rows[~readable] = 0
    return rows


def candidate_pairs(thumbs: np.ndarray, readable: np.ndarray) -> np.ndarray:
    """Pairs worth checking, as rows (i, j, zoom) with i's copy zoomed by `zoom` looking like j: for each image at
    each of ZOOMS, its NEIGHBOURS nearest others in the index with a cosine of at least MIN_COSINE; each unordered
    pair once (at the zoom where it looked most alike)."""
    n = len(thumbs)
    index = _index_rows(thumbs, readable)
    found, chunk = [], max(1, CELLS // max(n, 1))
    for z in ZOOMS:
        query = index if z == 1 else _index_rows(np.stack([_zoom(t, z) for t in thumbs]), readable)
        for start in range(0, n, chunk):
            sims = query[start : start + chunk] @ index.T
            rows = np.arange(start, min(start + chunk, n))
            sims[rows - start, rows] = -1  # not itself
            r, c = np.nonzero(sims >= MIN_COSINE)
            found.append(np.stack([r + start, c, np.full(len(r), z), sims[r, c]], 1))
    if not found or not sum(map(len, found)):
        return np.zeros((0, 3))
    p = np.concatenate(found)
    lookup = p[:, 0] * len(ZOOMS) + np.searchsorted(ZOOMS, p[:, 2])
    p, lookup = p[np.lexsort((-p[:, 3], lookup))], np.sort(lookup)
    first = np.searchsorted(lookup, lookup)  # where each lookup's rows start (sorted by cosine, highest first)
    p = p[np.arange(len(p)) - first < NEIGHBOURS]
    p = p[np.argsort(-p[:, 3], kind="stable")]
    i, j = p[:, 0].astype(np.int64), p[:, 1].astype(np.int64)
    _, keep = np.unique(np.minimum(i, j) * n + np.maximum(i, j), return_index=True)
    return p[np.sort(keep), :3]


def same_picture_scores(thumbs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """For each candidate pair (i, j, zoom), how alike the two pictures are once registered (see SAME_PICTURE):
    the fine check's correlation, or the coarse check's when it stops the pair (below COARSE_MIN)."""
    side = (COARSE_SIDE, COARSE_SIDE)
    coarse = [_high_pass(cv2.resize(t, side, interpolation=cv2.INTER_AREA), COARSE_SIGMA) for t in thumbs]

    def score(chunk: np.ndarray) -> list[float]:
        return [_pair_score(thumbs, coarse, int(i), int(j), z) for i, j, z in chunk]

    chunks = np.array_split(pairs, max(1, len(pairs) // 512))
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(tqdm(pool.map(score, chunks), total=len(chunks), desc="near-duplicate checks", disable=None))
    return np.array([s for part in done for s in part], np.float32)


def _high_pass(img: np.ndarray, sigma: float) -> np.ndarray:
    img = img.astype(np.float32)
    return img - cv2.GaussianBlur(img, (0, 0), sigma)


def _pair_score(thumbs: np.ndarray, coarse: list[np.ndarray], i: int, j: int, zoom: float) -> float:
    scale, best, (dx, dy) = _scale_search(coarse[i], coarse[j], zoom)
    if best < COARSE_MIN:
        return best
    a, b = _high_pass(thumbs[i], HIGH_PASS_SIGMA), _high_pass(thumbs[j], HIGH_PASS_SIGMA)
    centre = np.ascontiguousarray(b[MARGIN:-MARGIN, MARGIN:-MARGIN])
    if min(_detailed_tiles(a[MARGIN:-MARGIN, MARGIN:-MARGIN]), _detailed_tiles(centre)) < DETAILED_TILES:
        return 0.0
    # b's centre at u (from its corner) shows a at c + (u + MARGIN + shift - c) / scale (shift from 32 px to SIDE)
    c, k = (SIDE - 1) / 2, SIDE / COARSE_SIDE
    x0, y0 = c + (MARGIN + k * dx - c) / scale, c + (MARGIN + k * dy - c) / scale
    warp = np.array([[1 / scale, 0, x0], [0, 1 / scale, y0]], np.float32)
    try:
        _, warp = cv2.findTransformECC(centre, a, warp, cv2.MOTION_AFFINE, ECC_STOP, None, 1)
    except cv2.error:  # diverged: no registration makes them alike
        return best
    side = SIDE - 2 * MARGIN
    registered = cv2.warpAffine(a, warp, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    return float(cv2.matchTemplate(registered, centre, cv2.TM_CCOEFF_NORMED)[0, 0])


def _detailed_tiles(high_pass: np.ndarray) -> int:
    """How many of the image's 3 x 3 tiles have a spread of at least DETAIL grey levels."""
    n = high_pass.shape[0] // 3
    tiles = high_pass[: 3 * n, : 3 * n].reshape(3, n, 3, n)
    return int((tiles.std(axis=(1, 3)) >= DETAIL).sum())


def _scale_search(a: np.ndarray, b: np.ndarray, zoom: float) -> tuple[float, float, tuple[int, int]]:
    """a zoomed by zoom / COARSE_STEP, zoom and zoom * COARSE_STEP, b's centre matched over every shift: the scale at
    the peak of a parabola through the three best correlations, the best, and its shift (b's pixel u shows the
    zoomed a's u + shift)."""
    margin = a.shape[0] // 8
    centre = b[margin:-margin, margin:-margin]
    found = [
        cv2.minMaxLoc(cv2.matchTemplate(_zoom(a, zoom * COARSE_STEP**k), centre, cv2.TM_CCOEFF_NORMED))[1:4:2]
        for k in (-1, 0, 1)
    ]
    best = [v for v, _ in found]
    x, y = found[int(np.argmax(best))][1]
    return zoom * COARSE_STEP ** _peak(*best), max(best), (x - margin, y - margin)


def _peak(left: float, mid: float, right: float) -> float:
    """Where a parabola through (-1, left), (0, mid), (1, right) peaks, within [-1, 1] (the best end if none)."""
    curve = left - 2 * mid + right
    if curve < 0:
        return float(np.clip(0.5 * (left - right) / curve, -1, 1))
    return -1.0 if left > right else 1.0 if right > left else 0.0


CONFLICT = "the same pixels as another training image labelled otherwise (label noise)"


def label_conflicts(train: pd.DataFrame, h: Hashes) -> list[list[int]]:
    """Rows of each picture whose copies (the same decoded pixels) carry different labels, one list per picture."""
    frame = train.assign(pixels=h.pixels).reset_index(drop=True)
    return [
        copies.index.tolist()
        for _, copies in frame[frame.pixels != ""].groupby("pixels", sort=False)
        if len(copies) > 1 and (copies.age.nunique() > 1 or copies.gender.nunique() > 1)
    ]


def group_summary(train: pd.DataFrame, groups: np.ndarray, examples: int = 6) -> dict:
    """What the data report says of the groups: how many hold more than one image, how many images they hold, the
    largest, and a few example pairs (ids and files, for the report's thumbnails)."""
    sizes = pd.Series(groups).value_counts()
    multi = sizes[sizes > 1]
    pairs = []
    for g in multi.index[:examples]:
        members = train[groups == g].iloc[:2]
        pairs.append({"ids": members.id.astype(str).tolist(), "paths": members.path.astype(str).tolist()})
    return {
        "groups": int(len(multi)),
        "images_in_groups": int(multi.sum()),
        "largest": int(multi.max()) if len(multi) else 1,
        "examples": pairs,
    }
