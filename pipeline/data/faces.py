"""Offline face detection (YuNet, OpenCV Zoo's face_detection_yunet_2023mar.onnx, MIT, shipped in this package and
run by OpenCV's own cv2.FaceDetectorYN: the same detector on every Python, no download, no torch) and face crops
aligned by the eyes and framed the way the UTKFace chips are."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..core.errors import DataError
from .imaging import WORKERS, decode_rgb, ordered_map, read_bytes, square_resize

# Framing of the UTKFace aligned+cropped chips, measured by benchmarks/face_framing.py on developer-set chips:
# in the frame rotated so that the eyes are level, with s = CHIP_EYE_WEIGHT * eye distance + CHIP_MOUTH_WEIGHT *
# eye-to-mouth distance (eye midpoint to mouth midpoint), the chip is a square of side s whose centre lies at
# the eye midpoint + (CHIP_DX, CHIP_DY) * s.
# Fitted on 1,500 chips; on 1,500 others the square from the detection overlaps the chip with IoU 0.91 (mean).
CHIP_EYE_WEIGHT = 0.9880
CHIP_MOUTH_WEIGHT = 1.5379
CHIP_DX = 0.0084
CHIP_DY = 0.2185
CHIP_SIZE = 200  # the chips' side in pixels: crops for a model trained on them are made at this size

DETECT_MAX_SIDE = 640  # larger photos are detected on a copy downscaled to this longest side
DETECT_MIN_SIDE = 128  # smaller ones on a copy upscaled to it (YuNet misses faces under ~40 pixels)
# Small images (crops, chips) are padded by this fraction of their side before detection: on the chips it gave
# slightly better landmarks (framing IoU 0.910 vs 0.902); on photos it would double the detection time.
DETECT_PAD = 0.25
DETECT_PAD_UP_TO = 400  # longest side (after scaling) up to which the padding is applied
MIN_SCORE = 0.75  # 99.5% of UTKFace chips score >= 0.90 (4 in 3,000 under 0.75); textures, a space suit <= 0.74
DETECT_POOL_FROM = 200  # images from which detect_all runs in a process pool (starting one takes ~2 s)
DETECT_CHUNK = 32  # images a detection task
YUNET_MODEL = Path(__file__).with_name("yunet") / "face_detection_yunet_2023mar.onnx"
YUNET_SCORE = 0.5  # the detector's own floor (min_score filters above it); NMS and top-k as OpenCV Zoo's demo
YUNET_NMS = 0.3
YUNET_TOP_K = 5000


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, w, h in the image's pixels
    score: float  # detector confidence in [0, 1]
    landmarks: tuple[tuple[float, float], ...]  # eyes, nose tip, mouth corners; each pair left then right as seen


_local = threading.local()  # a detector per thread: cv2.FaceDetectorYN keeps its input size as state


def _yunet(size: tuple[int, int]) -> cv2.FaceDetectorYN:
    """This thread's YuNet, set to an input of `size` (width, height)."""
    det = getattr(_local, "yunet", None)
    if det is None:
        with _opencv_errors_only():  # OpenCV 5 warns that its new engine ignores backend targets
            det = cv2.FaceDetectorYN.create(str(YUNET_MODEL), "", size, YUNET_SCORE, YUNET_NMS, YUNET_TOP_K)
        _local.yunet = det
    det.setInputSize(size)
    return det


@contextlib.contextmanager
def _opencv_errors_only():
    """OpenCV's log level at ERROR for a while; its logging API sits in cv2.utils.logging or in cv2, by build."""
    api = next((m for m in (getattr(cv2.utils, "logging", None), cv2) if hasattr(m, "setLogLevel")), None)
    if api is None or not hasattr(api, "getLogLevel"):
        yield
        return
    level = api.getLogLevel()
    api.setLogLevel(2)  # cv::utils::logging::LOG_LEVEL_ERROR
    try:
        yield
    finally:
        api.setLogLevel(level)


def detect_faces(rgb: np.ndarray, min_score: float = MIN_SCORE, max_side: int = DETECT_MAX_SIDE) -> list[Face]:
    """Faces in an RGB uint8 image, best score first (ties left to right). Large images are detected on a
    downscaled copy; boxes and landmarks are in the input image's pixels."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if max(h, w) < DETECT_MIN_SIDE:
        scale = DETECT_MIN_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = (
        rgb if scale == 1.0 else cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    )
    scale_x, scale_y = size[0] / w, size[1] / h
    pad = round(DETECT_PAD * max(small.shape[:2])) if max(small.shape[:2]) <= DETECT_PAD_UP_TO else 0
    bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
    if pad:
        bgr = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    _, rows = _yunet((bgr.shape[1], bgr.shape[0])).detect(bgr)
    faces = []
    for row in np.zeros((0, 15)) if rows is None else rows.astype(np.float64):
        score = float(row[14])
        if score < min_score:
            continue
        x, y, bw, bh = (row[0:4] - [pad, pad, 0, 0]) / [scale_x, scale_y, scale_x, scale_y]
        points = (row[4:14].reshape(5, 2) - pad) / [scale_x, scale_y]
        box = (float(x), float(y), float(bw), float(bh))
        faces.append(Face(box, score, tuple((float(px), float(py)) for px, py in points)))
    return sorted(faces, key=lambda f: (-f.score, f.box[0], f.box[1]))


def chip_frame(face: Face) -> tuple[np.ndarray, float, float]:
    """The square a face's chip covers: (centre x, y), side, and the angle (radians) of the eye line."""
    pts = np.asarray(face.landmarks)
    eye_l, eye_r = pts[0], pts[1]
    eyes = (eye_l + eye_r) / 2
    mouth = (pts[3] + pts[4]) / 2
    dx, dy = eye_r - eye_l
    angle = float(np.arctan2(dy, dx))
    side = CHIP_EYE_WEIGHT * float(np.hypot(dx, dy)) + CHIP_MOUTH_WEIGHT * float(np.linalg.norm(mouth - eyes))
    c, s = np.cos(angle), np.sin(angle)
    centre = eyes + side * np.array([c * CHIP_DX - s * CHIP_DY, s * CHIP_DX + c * CHIP_DY])
    return centre, side, angle


def frame_corners(face: Face) -> np.ndarray:
    """The 4 corners (x, y) of the chip square in the image, clockwise from the top left."""
    centre, side, angle = chip_frame(face)
    c, s = np.cos(angle), np.sin(angle)
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * side / 2
    return centre + unit @ np.array([[c, s], [-s, c]])


def crop_face(
    rgb: np.ndarray, face: Face, out_size: int | None = None, border: int = cv2.BORDER_CONSTANT
) -> np.ndarray:
    """The face as a square RGB uint8 crop, eyes level, framed like a UTKFace chip; out_size x out_size, or at
    the photo's own resolution when None. Parts outside the photo are black (`border`), as in the UTKFace chips
    (cv2.BORDER_REPLICATE repeats the edge instead)."""
    centre, side, angle = chip_frame(face)
    native = max(1, round(side))
    k = native / side
    c, s = np.cos(angle) * k, np.sin(angle) * k
    a = np.array([[c, s], [-s, c]])  # rotates the eye line onto the x axis
    # pixel centres sit at integer coordinates in OpenCV, at +0.5 in the continuous frame of the landmarks
    t = (native / 2 - 0.5) - a @ (centre - 0.5)
    m = np.hstack([a, t[:, None]])
    crop = cv2.warpAffine(rgb, m, (native, native), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)
    if out_size is None or out_size == native:
        return crop
    interp = cv2.INTER_AREA if out_size < native else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_size, out_size), interpolation=interp)


def best_face(path: str) -> Face | None:
    """The highest-score face in an image file; None when it has none or cannot be decoded."""
    try:
        found = detect_faces(decode_rgb(read_bytes(path))) if path else []
    except DataError:
        return None  # the cache's own decode reports why
    return found[0] if found else None


def native_face(path: str, fit: str, face: Face | None = None) -> np.ndarray:
    """An image file (cropped to `face` when given) squared by `fit` at its own resolution, so that a bundle's
    resize of it equals the cache's decode_image(path, size, fit, face) at every size (a stretch-fitted non-square
    image is only approximated)."""
    rgb = decode_rgb(read_bytes(path))  # decoded once: decode_image's own steps, at the file's size
    if face is not None:
        rgb = crop_face(rgb, face)
    h, w = rgb.shape[:2]
    return square_resize(rgb, max(h, w) if fit == "pad" else min(h, w), fit)


def _best_faces(paths: list[str]) -> list[Face | None]:
    return [best_face(p) for p in paths]


def detect_all(paths: list[str], desc: str) -> list[Face | None]:
    """best_face of every path, in order; from DETECT_POOL_FROM images on in WORKERS processes (one OpenCV
    thread each), DETECT_CHUNK images a task."""
    if WORKERS == 1 or len(paths) < DETECT_POOL_FROM:
        return [best_face(p) for p in tqdm(paths, desc=desc, unit="img")]
    chunks = [paths[i : i + DETECT_CHUNK] for i in range(0, len(paths), DETECT_CHUNK)]
    found: list[Face | None] = []
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for part in ordered_map(_best_faces, chunks, WORKERS, ahead=2, died=_detector_died):
            found.extend(part)
            bar.update(len(part))
    return found


def _detector_died(chunk: list[str]) -> str:
    return (
        f"face detection: a worker process died (a crash in the image decoder or the face detector) on one of "
        f"{len(chunk)} images from {chunk[0]}"
    )
