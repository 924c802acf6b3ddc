"""Decode every image once (upright, square, resized; cropped to its face with data.face_crop=detect) and cache
the result as a memory-mapped uint8 array under data.cache_dir, keyed by the files' contents."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..core.config import Config
from ..core.errors import DataError
from ..core.files import atomic_path, remove_stale_temporaries, write_text
from .competition import Competition, FaceCropCounts
from .faces import Face, crop_face, detect_all
from .imaging import (  # WORKERS: decode threads, detection processes
    WORKERS,
    decode_rgb,
    files_key,
    read_bytes,
    square_resize,
)

CACHE_VERSION = 2  # 2: EXIF orientation applied, data.fit
FACES_VERSION = 2  # data.face_crop=detect caches: bump when faces.py's detection or framing changes
cv2.setNumThreads(1)  # decoding runs in our own thread pool; OpenCV's pool would oversubscribe


def decode_image(path: str, size: int, fit: str = "stretch", face: Face | None = None, zoom: float = 1.0) -> np.ndarray:
    """Any image file -> size x size x 3 RGB uint8, upright per its EXIF orientation, cropped to `face` when
    given (faces.crop_face), made square by `fit` (stretch | center_crop | pad), its centred 1/zoom kept. Raises
    DataError with the reason."""
    if not path:
        raise DataError("no image file")
    rgb = decode_rgb(read_bytes(path))
    if face is not None:
        rgb = crop_face(rgb, face)
    return square_resize(rgb, size, fit, zoom)


def _cache_key(paths: list[str], size: int, fit: str, face_crop: str = "none", zoom: float = 1.0) -> str:
    head = f"v{CACHE_VERSION}|{size}|{fit}"
    if face_crop != "none":  # appended only then, so that the caches made before face_crop keep their key
        head += f"|{face_crop}-v{FACES_VERSION}"
    if zoom != 1.0:  # likewise
        head += f"|zoom-{zoom!r}"
    return files_key(head, paths)


def find_faces(paths: list[str], cache_dir: str, tag: str) -> list[Face | None]:
    """best_face of each image, detected once per file list and kept in cache_dir, so that the caches of every
    image size crop from the same detection."""
    key = files_key(f"faces-v{FACES_VERSION}", paths)
    path = Path(cache_dir) / f"{tag}-faces-{key}.json"
    if not path.is_file():
        found = detect_all(paths, f"faces {tag}")
        write_text(json.dumps([asdict(f) if f else None for f in found]), path)
    return [_face_from_json(row) if row else None for row in json.loads(path.read_text())]


def _face_from_json(row: dict) -> Face:
    return Face(tuple(row["box"]), row["score"], tuple(tuple(p) for p in row["landmarks"]))


def cached_images(
    paths: list[str],
    size: int,
    cache_dir: str,
    tag: str,
    fit: str = "stretch",
    face_crop: str = "none",
    zoom: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode `paths` once into a memory-mapped N x size x size x 3 uint8 array (rebuilt when any source
    file, the size, the fit, face_crop or zoom changes). face_crop=detect crops each image to its face
    (find_faces) first; images without one stay whole. Returns (images, ok mask, error per image or '')."""
    key = _cache_key(paths, size, fit, face_crop, zoom)
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    arr_path = folder / f"{tag}-{size}px-{key}.npy"
    meta_path = folder / f"{tag}-{size}px-{key}.json"
    if arr_path.is_file() and meta_path.is_file():
        errors = json.loads(meta_path.read_text())["errors"]
        return np.load(arr_path, mmap_mode="r"), np.array([not e for e in errors]), errors
    remove_stale_temporaries(folder)
    faces = find_faces(paths, cache_dir, tag) if face_crop == "detect" else [None] * len(paths)
    errors = [""] * len(paths)
    with atomic_path(arr_path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))

        def work(i: int, out: np.ndarray = arr) -> None:
            try:
                out[i] = decode_image(paths[i], size, fit, faces[i], zoom)
            except DataError as e:
                errors[i] = str(e)
                out[i] = 0

        with ThreadPoolExecutor(WORKERS) as pool:
            list(tqdm(pool.map(work, range(len(paths))), total=len(paths), desc=f"cache {tag} {size}px", unit="img"))
        arr.flush()
        del arr
    with atomic_path(meta_path) as tmp:
        Path(tmp).write_text(json.dumps({"errors": errors}))
    return np.load(arr_path, mmap_mode="r"), np.array([not e for e in errors]), errors


@dataclass
class Images:
    train: np.ndarray  # N x S x S x 3 uint8, rows aligned with Competition.train
    test: np.ndarray


def prepare_images(comp: Competition, cfg: Config, size: int) -> tuple[Competition, Images]:
    """Decode and cache train and test images at `size` (cfg.data.fit, cfg.data.face_crop). Returns a new
    Competition without the unreadable training rows (listed in its skipped), with the face_crop=detect counts,
    and the images; stops instead with on_error=fail."""
    d = cfg.data
    train_paths, test_paths = comp.train.path.tolist(), comp.test.path.tolist()
    train_tag, test_tag = f"{comp.name}-train", f"{comp.name}-test"
    tr, ok, errors = cached_images(train_paths, size, d.cache_folder, train_tag, d.fit, d.face_crop, d.zoom)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        first = comp.train.path.iat[bad[0]]
        if d.on_error == "fail":
            raise DataError(f"{first}: {errors[bad[0]]} ({len(bad)} unreadable training images)")
        print(f"skipping {len(bad)} unreadable training images, e.g. {first}: {errors[bad[0]]}")
        comp = replace(
            comp,
            train=comp.train.iloc[np.flatnonzero(ok)].reset_index(drop=True),
            skipped=[*comp.skipped, *((comp.train.path.iat[i], errors[i]) for i in bad)],
        )
        tr = tr[ok]
    te, ok_t = np.zeros((0, size, size, 3), np.uint8), np.zeros(0, bool)
    if len(comp.test):
        te, ok_t, errors_t = cached_images(test_paths, size, d.cache_folder, test_tag, d.fit, d.face_crop, d.zoom)
        if not ok_t.all():
            bad = np.flatnonzero(~ok_t)
            print(
                f"WARNING: {len(bad)} TEST images are unreadable "
                f"(e.g. {comp.test.id.iat[bad[0]]}: {errors_t[bad[0]]}); "
                "they keep their row in the submission, predicted from a blank image"
            )
    if d.face_crop == "detect":
        counts = FaceCropCounts(
            int(ok.sum()),
            int(ok_t.sum()),
            _without_face(train_paths, ok, d.cache_folder, train_tag),
            _without_face(test_paths, ok_t, d.cache_folder, test_tag) if len(test_paths) else [],
        )
        comp = replace(comp, face_crop=counts)
    return comp, Images(train=tr, test=te)


def _without_face(paths: list[str], ok: np.ndarray, cache_dir: str, tag: str) -> list[str]:
    """The readable images among `paths` in which find_faces found no face."""
    faces = find_faces(paths, cache_dir, tag)
    return [p for p, good, face in zip(paths, ok, faces) if good and face is None]
