"""Duplicate and same-person groups (folds.groups), so that no copy of a photo (re-encoded, resized, renamed, slightly
shifted) and no person is on both sides of a fold or of the hold-out split; and copies with the same pixels but
other labels, which are label noise."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from ..core.errors import DataError
from ..core.files import atomic_path
from .imaging import WORKERS, decode_rgb, files_key, read_bytes

HASH_VERSION = 2  # 2: the groups stored with the hashes
# Two images are the same photo when their 64-bit DCT hashes (imagehash.phash) differ in at most NEAR_BITS bits, or
# in at most SHIFTED_BITS while their mean hashes (average_hash, coarser but steadier under a shift of a few pixels)
# differ in at most SHIFTED_MEAN_BITS. Measured on UTKFace's 21,351 aligned chips (docs/RESULTS.md): every sampled
# pair at phash <= 2 was one photo, a third at 4 and a sixth at 6 (faces aligned alike sit close in hash space); 9 of
# 12 sampled pairs at phash 4-6 with average_hash <= 2 were one photo, mostly shifted or re-cropped copies.
NEAR_BITS, SHIFTED_BITS, SHIFTED_MEAN_BITS = 2, 6, 2
CHUNK = 2048  # rows of the pairwise distance matrix computed at once


@dataclass
class Hashes:
    phash: np.ndarray  # uint64 per file (0 for an unreadable one)
    mean_hash: np.ndarray  # uint64: imagehash.average_hash
    pixels: np.ndarray  # str: digest of the decoded pixels ("" for an unreadable file)
    groups: np.ndarray | None = None  # near_duplicate_groups of these hashes (image_hashes stores them alongside)


def image_hashes(paths: list[str], cache_dir: str) -> Hashes:
    """Every file's perceptual hashes, pixel digest and near-duplicate group, computed once (decoding each file;
    the pairwise distances take ~6 s for 21k images) and kept in cache_dir."""
    store = Path(cache_dir) / f"hashes-{files_key(f'hashes-v{HASH_VERSION}', paths)}.npz"
    if store.is_file():
        with np.load(store) as z:
            return Hashes(z["phash"], z["mean_hash"], z["pixels"], z["groups"])
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(tqdm(pool.map(_hash_file, paths), total=len(paths), desc="image hashes", unit="img", disable=None))
    phash, mean_hash, pixels = zip(*done) if done else ((), (), ())
    hashes = Hashes(np.array(phash, np.uint64), np.array(mean_hash, np.uint64), np.array(pixels, str))
    hashes.groups = near_duplicate_groups(hashes)
    store.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(store) as tmp, open(tmp, "wb") as f:
        np.savez(f, phash=hashes.phash, mean_hash=hashes.mean_hash, pixels=hashes.pixels, groups=hashes.groups)
    return hashes


def _hash_file(path: str) -> tuple[int, int, str]:
    try:
        img = decode_rgb(read_bytes(path))
    except DataError:
        return 0, 0, ""  # unreadable: the image cache reports it and skips the row
    digest = hashlib.blake2b(img.tobytes(), digest_size=16)
    digest.update(str(img.shape).encode())
    pil = Image.fromarray(img)
    return int(str(imagehash.phash(pil)), 16), int(str(imagehash.average_hash(pil)), 16), digest.hexdigest()


def near_duplicate_groups(h: Hashes) -> np.ndarray:
    """A group id per image: images joined when they look like the same photo (see NEAR_BITS), and whatever joins
    them in a chain. Unreadable files stay alone."""
    n, readable = len(h.phash), h.pixels != ""
    rows, cols = [], []
    for i in range(0, n, CHUNK):
        bits = np.bitwise_count(h.phash[i : i + CHUNK, None] ^ h.phash[None, :])
        mean_bits = np.bitwise_count(h.mean_hash[i : i + CHUNK, None] ^ h.mean_hash[None, :])
        r, c = np.nonzero((bits <= NEAR_BITS) | ((bits <= SHIFTED_BITS) & (mean_bits <= SHIFTED_MEAN_BITS)))
        keep = (c > r + i) & readable[r + i] & readable[c]
        rows.append(r[keep] + i)
        cols.append(c[keep])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


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
