"""Pixels: decode any image file upright to RGB, make it square, resize. numpy and OpenCV only (no torch, no
scikit-learn), so that a bundle predicting on photos needs nothing more."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice

import cv2
import numpy as np

from ..core.choices import FITS
from ..core.cores import usable_cores
from ..core.errors import DataError, PipelineError

WORKERS = min(8, usable_cores())  # threads or processes that decode (and detect faces in) images
# ANYDEPTH | ANYCOLOR keeps 16-bit and grayscale (as IMREAD_UNCHANGED would) but, unlike IMREAD_UNCHANGED,
# applies the EXIF orientation (JPEG, PNG, WebP, TIFF); the alpha channel is dropped.
IMREAD_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def fit_square(img: np.ndarray, fit: str) -> np.ndarray:
    """A non-square image as a square: unchanged (stretch: the resize does it), its largest centred
    square (center_crop) or centred on a black square (pad)."""
    h, w = img.shape[:2]
    if h == w or fit == "stretch":
        return img
    if fit == "center_crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return img[top : top + s, left : left + s]
    if fit == "pad":
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        return cv2.copyMakeBorder(img, top, s - h - top, left, s - w - left, cv2.BORDER_CONSTANT, value=0)
    raise ValueError(f"unknown fit {fit!r}; choose one of {FITS}")


def read_bytes(path: str) -> np.ndarray:
    """An image file's bytes, for decode_rgb. Raises DataError when it cannot be read or is empty."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror})") from None
    if raw.size == 0:
        raise DataError("empty file (0 bytes)")
    return raw


def decode_rgb(raw: np.ndarray) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 RGB uint8, upright per its EXIF orientation (first frame of an
    animation; 16-bit, float, grayscale, RGBA and CMYK converted). Raises DataError with the reason."""
    try:
        img = cv2.imdecode(raw, IMREAD_FLAGS)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise DataError("not a readable image (corrupt, truncated or not an image)")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def zoom_centre(img: np.ndarray, zoom: float) -> np.ndarray:
    """The centred 1/zoom of an image's height and width (zoom >= 1): a tighter crop around a centred face."""
    if zoom == 1.0:
        return img
    h, w = img.shape[:2]
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top : top + ch, left : left + cw]


def square_resize(img: np.ndarray, size: int, fit: str, zoom: float = 1.0) -> np.ndarray:
    """An RGB image made square by `fit`, its centred 1/zoom kept (data.zoom), resized to size x size: what the
    cache holds, and what a bundle feeds its models."""
    img = zoom_centre(fit_square(img, fit), zoom)
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def start_worker() -> None:
    """Initializer of the processes that decode and detect: Ctrl-C is the main process's to handle (an idle
    worker would print a traceback), and one OpenCV thread each (a worker per core)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)


def ordered_map(fn: Callable, items: Iterable, workers: int, ahead: int, died: Callable[[object], str]) -> Iterator:
    """fn of each item, in order, in `workers` spawned processes (YuNet holds the GIL, so threads would not
    overlap; spawned, not forked: torch or onnxruntime threads may be running), `ahead` items a worker ahead of
    the caller. When the caller stops (an error, Ctrl-C) the items not started are dropped, so it stops at once.
    A worker that dies (a crash in a decoder or the detector) is a PipelineError saying died(item)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=start_worker) as pool:
        todo = iter(items)
        queue = deque((x, pool.submit(fn, x)) for x in islice(todo, ahead * workers))
        try:
            while queue:
                item, future = queue.popleft()
                try:
                    out = future.result()
                except BrokenProcessPool:
                    raise PipelineError(died(item)) from None
                queue.extend((x, pool.submit(fn, x)) for x in islice(todo, 1))
                yield out
        finally:
            for _, future in queue:
                future.cancel()


DIGEST_SPAN = 1 << 16  # cache keys read this many bytes from the start and from the end of each file


def _file_digest(path: str) -> str:
    """The file's size and a digest of its first and last 64 KiB (all of it for the usual image), not its mtime:
    a fresh copy of the same data (a re-synced or re-mounted dataset) keeps its caches; 21k chips take ~0.5 s."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.blake2b(f.read(DIGEST_SPAN), digest_size=16)
        if size > DIGEST_SPAN:
            f.seek(max(DIGEST_SPAN, size - DIGEST_SPAN))
            h.update(f.read())
    return f"{size}|{h.hexdigest()}"


def files_key(head: str, paths: list[str]) -> str:
    h = hashlib.sha1(head.encode())
    for p in paths:
        try:
            h.update(f"{p}|{_file_digest(p)}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:16]
