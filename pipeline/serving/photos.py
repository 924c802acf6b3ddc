"""Age and gender for every face in any photos: decode (upright, 8-bit RGB), detect, crop like a UTKFace chip,
predict with an exported bundle. `python -m pipeline predict-images BUNDLE PATH... [--out preds.csv]`."""

from __future__ import annotations

import argparse
import glob
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from ..core.calibration import min_age_answer
from ..core.errors import DataError, PipelineError
from ..core.files import write_csv
from ..data import faces
from ..data.imaging import WORKERS, decode_rgb, ordered_map, read_bytes  # WORKERS: processes that decode, detect

if TYPE_CHECKING:
    from .bundle import RunnersFactory

FLOAT_FORMAT = "%.4f"  # the table's ages and probabilities: 4 decimals, as printed

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MAX_PIXELS = 100_000_000  # larger images are refused from their header, before any decoding
CROP_SIZE = faces.CHIP_SIZE
SMALL_FACE = 40  # faces smaller than this (pixels, box side) get a note: little detail to read an age from
NO_FACE = "no face found"
COLUMNS = ["file", "face", "x", "y", "w", "h", "score", "age", "age_low", "age_high", "gender_prob", "gender"]
INTERVAL = ["age_low", "age_high"]  # only from a calibrated bundle
POOL_FROM = 16  # photos from which those processes are worth starting (spawning them takes ~1-2 s)
AHEAD = 4  # photos per worker process read ahead of the predictions


def image_pixels(raw: np.ndarray) -> tuple[int, str] | None:
    """(pixel count, "W x H pixels") from the file's header without decoding the pixels; None when Pillow cannot
    read the header (OpenCV decides then)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw.tobytes())) as im:
                w, h = im.size
                return w * h, f"{w} x {h} pixels"
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit; it names only the pixel count
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = int(m.group(1)) if m else Image.MAX_IMAGE_PIXELS * 2 + 1
        return n, f"{n / 1e6:.0f} Mpx"
    except Exception:  # not an image Pillow knows
        return None


def read_photo(path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A photo file at full resolution as RGB uint8; refuses images over `max_pixels` before decoding them."""
    if os.path.isdir(path):
        raise DataError("a folder without image files")
    raw = read_bytes(path)
    header = image_pixels(raw)
    if header and header[0] > max_pixels:
        raise DataError(
            f"image too large: {header[1]}, the limit is {max_pixels / 1e6:.0f} Mpx "
            "(not decoded: a decompression bomb or a scan far larger than a photo)"
        )
    return decode_rgb(raw)


def photo_paths(args: list[str]) -> list[str]:
    """Files as given, image files under folders (recursively, sorted), glob matches (sorted). Anything that
    does not exist is kept as given, so that it gets a row saying so."""
    out: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            found = [str(p) for p in sorted(Path(arg).rglob("*")) if p.suffix.lower() in PHOTO_EXTS and p.is_file()]
            out.extend(found or [arg])
        elif os.path.exists(arg) or not glob.has_magic(arg):
            out.append(arg)
        else:
            matches = sorted(m for m in glob.glob(arg, recursive=True) if os.path.isfile(m))
            out.extend(matches or [arg])
    return list(dict.fromkeys(out))


def whole_image(rgb: np.ndarray) -> np.ndarray:
    """The largest centred square (the pipeline's default data.fit), at the crop size."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    square = rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    interp = cv2.INTER_AREA if s > CROP_SIZE else cv2.INTER_LINEAR
    return cv2.resize(square, (CROP_SIZE, CROP_SIZE), interpolation=interp)


def _face_row(path: str, index: int, face: faces.Face) -> dict:
    x, y, w, h = face.box
    note = f"small face ({max(w, h):.0f} px): less reliable" if max(w, h) < SMALL_FACE else ""
    return {"file": path, "face": index, "x": x, "y": y, "w": w, "h": h, "score": face.score, "note": note}


def face_rows(
    name: str, rgb: np.ndarray, whole_image_if_no_face: bool = False, detect_size: int = faces.DETECT_MAX_SIDE
) -> tuple[list[dict], list[np.ndarray]]:
    """A decoded photo's rows (one per face, best score first; or one face = -1 row saying there is none) and the
    crops to predict, one per row that gets a prediction (crops[i] <-> rows[i]). Faces are looked for on a copy
    of at most `detect_size` pixels on its longest side (crops come from the full photo)."""
    found = faces.detect_faces(rgb, max_side=detect_size)
    if not found:
        h, w = rgb.shape[:2]
        row = {"file": name, "face": -1, "note": NO_FACE}
        if not whole_image_if_no_face:
            return [row], []
        row.update(x=0.0, y=0.0, w=float(w), h=float(h), note=f"{NO_FACE}: predicted on the whole image")
        return [row], [whole_image(rgb)]
    return [_face_row(name, i, f) for i, f in enumerate(found)], [faces.crop_face(rgb, f, CROP_SIZE) for f in found]


def unreadable_row(name: str, error: DataError) -> dict:
    return {"file": name, "face": -1, "note": str(error)}


def _photo_rows(path: str, whole_image_if_no_face: bool, detect_size: int) -> tuple[list[dict], list[np.ndarray]]:
    try:
        rgb = read_photo(path)
    except DataError as e:
        return [unreadable_row(path, e)], []
    return face_rows(path, rgb, whole_image_if_no_face, detect_size)


def _photos_rows(
    paths: list[str], whole_image_if_no_face: bool, detect_size: int, workers: int
) -> Iterator[tuple[list, list]]:
    """_photo_rows of each path, in order; with many photos in worker processes, a few photos ahead of the caller,
    so that detection goes on while the caller predicts."""
    work = partial(_photo_rows, whole_image_if_no_face=whole_image_if_no_face, detect_size=detect_size)
    if workers <= 1 or len(paths) < POOL_FROM:
        return map(work, paths)
    return ordered_map(work, paths, workers, AHEAD, died=_died)


def _died(path: str) -> str:
    return (
        f"{path}: the worker process reading it died (a crash in the image decoder or the face detector, on this "
        "photo or one read beside it)"
    )


def predict_image(
    bundle, name: str, rgb: np.ndarray, whole_image_if_no_face: bool = False, detect_size: int = faces.DETECT_MAX_SIDE
) -> list[dict]:
    """predict_images' rows for one decoded photo, with `name` in the file column (table() makes them a table)."""
    rows, crops = face_rows(name, rgb, whole_image_if_no_face, detect_size)
    if crops:
        for row, pred in zip(rows, bundle.predict(crops).to_dict("records"), strict=True):
            row.update(pred)
    return rows


def predict_images(
    bundle,
    paths: list[str],
    whole_image_if_no_face: bool = False,
    batch_size: int = 32,
    detect_size: int = faces.DETECT_MAX_SIDE,
    workers: int = WORKERS,
    min_age: float | None = None,
) -> pd.DataFrame:
    """One row per detected face (file, face index, box x y w h in the upright photo's pixels, detector score,
    age, gender_prob, gender[, gender_label], note); a photo without a face or that cannot be read gets one
    row with face = -1 and the reason in `note` (with whole_image_if_no_face, a prediction on the whole
    image). `bundle.predict(list of RGB uint8 crops)` returns age[, age_low, age_high], gender_prob,
    gender[, gender_label]; with min_age, an at_least_<min_age> column answers yes / no / unsure."""
    if min_age is not None:
        check_min_age(bundle, min_age)
    rows: list[dict] = []
    pending: list[tuple[int, np.ndarray]] = []  # (row index, crop) waiting for a full batch

    def flush(size: int) -> None:
        """Predict the pending crops in batches of `size`, leaving fewer than `size` pending."""
        while len(pending) >= max(size, 1):
            batch = pending[:size]
            del pending[:size]
            preds = bundle.predict([crop for _, crop in batch])
            for (i, _), pred in zip(batch, preds.to_dict("records"), strict=True):
                rows[i].update(pred)

    found = _photos_rows(paths, whole_image_if_no_face, detect_size, workers)
    bar = tqdm(found, total=len(paths), desc="predict-images", unit="photo", file=sys.stderr, disable=len(paths) < 2)
    for photo_rows, crops in bar:
        first = len(rows)
        rows.extend(photo_rows)
        pending.extend((first + k, crop) for k, crop in enumerate(crops))
        flush(batch_size)
    flush(len(pending))
    return table(rows, min_age, bundle.calibration is not None)


def table(rows: list[dict], min_age: float | None = None, intervals: bool = False) -> pd.DataFrame:
    """Rows as predict-images writes them: COLUMNS (age_low, age_high from a calibrated bundle, or when predicted),
    then gender_label when predicted, then at_least_<min_age> (yes / no / unsure, when asked), then note."""
    df = pd.DataFrame(rows)
    columns = [c for c in COLUMNS if c not in INTERVAL or intervals or c in df.columns]
    extra = [c for c in df.columns if c not in COLUMNS and c != "note"]
    df = df.reindex(columns=[*columns, *extra, "note"])
    if min_age is not None:
        df.insert(len(df.columns) - 1, min_age_column(min_age), min_age_answers(df, min_age))
    df["face"] = df["face"].astype("int64")
    df["gender"] = df["gender"].astype("Int64")  # 0/1 as in the training labels, empty where no prediction
    df["note"] = df["note"].fillna("")
    return df


def check_min_age(bundle, min_age: float) -> None:
    """Refuses an "at least min_age?" question the bundle cannot answer."""
    from .bundle import NO_CALIBRATION

    if bundle.calibration is None:
        raise PipelineError(f"--min-age needs age intervals: {NO_CALIBRATION}")
    if min_age > bundle.info.max_age:
        raise PipelineError(f"--min-age {min_age:g} is above {bundle.info.max_age:g}, the oldest age the bundle gives")


def min_age_column(min_age: float) -> str:
    return f"at_least_{min_age:g}"


def min_age_answers(df: pd.DataFrame, min_age: float) -> pd.Series:
    """Is each face at least min_age? yes / no / unsure (the interval straddles it); empty without a prediction."""
    answers = pd.Series("", index=df.index, dtype=object)
    if "age_low" not in df.columns:
        return answers
    done = df.age_low.notna()
    if not done.any():
        return answers
    answers[done] = min_age_answer(df.age_low[done], df.age_high[done], min_age)
    return answers


def _min_age(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 150:
        raise argparse.ArgumentTypeError(f"expected an age in years from 0 to 150, got {text!r}")
    return value


def _detect_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < faces.DETECT_MIN_SIDE:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels >= {faces.DETECT_MIN_SIDE}, got {text!r}")
    return value


def add_detect_size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--detect-size",
        type=_detect_size,
        default=faces.DETECT_MAX_SIDE,
        metavar="PX",
        help=f"look for faces on a copy this many pixels on its longest side (default {faces.DETECT_MAX_SIDE}); "
        "larger finds smaller faces in large photos, and is slower",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """agegender predict-images' arguments (orchestration/cli.py adds them to its subcommand)."""
    p.add_argument("bundle", metavar="BUNDLE", help="an exported bundle, its folder or archive (agegender export)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    p.add_argument("--out", metavar="CSV", help="write the table to this CSV (default: print it)")
    p.add_argument("--whole-image", action="store_true", help="predict on the whole photo when it has no face")
    p.add_argument(
        "--min-age",
        type=_min_age,
        metavar="N",
        help='also answer "at least N years old?" per face: yes, no, or unsure when the age interval holds N',
    )
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="faces per batch of the bundle (default 32)")
    add_detect_size(p)
    workers = f"processes that decode and detect (default {WORKERS})"
    p.add_argument("--workers", type=int, default=WORKERS, metavar="N", help=workers)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when there is one")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agegender predict-images",
        description="Age and gender for every face in photos (files, folders searched recursively, globs).",
    )
    add_arguments(p)
    return p


def predict_images_cli(argv: list[str], torch_runners: RunnersFactory | None = None) -> int:
    """agegender predict-images ARGS; torch_runners (the command passes it) lets a torch bundle load."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage and the problem
        return int(e.code or 0)
    return run_cli(args, torch_runners)


def run_cli(args: argparse.Namespace, torch_runners: RunnersFactory | None = None) -> int:
    """agegender predict-images with its parsed arguments (add_arguments)."""
    for flag, value, least in (("batch-size", args.batch_size, 1), ("workers", args.workers, 1)):
        if value < least:
            print(f"error: --{flag} must be at least {least}", file=sys.stderr)
            return 2
    from .bundle import NAME_THEM, load_bundle

    try:
        bundle = load_bundle(args.bundle, device=args.device, torch_runners=torch_runners)
        if not bundle.labels_known:
            print(f"note: {NAME_THEM}", file=sys.stderr)
        paths = photo_paths(args.paths)
        df = predict_images(
            bundle,
            paths,
            args.whole_image,
            args.batch_size,
            detect_size=args.detect_size,
            workers=args.workers,
            min_age=args.min_age,
        )
        for row in df[(df.face < 0) & (df.note != "")].itertuples():
            print(f"{row.file}: {row.note}", file=sys.stderr)
        if args.out:
            write_csv(df, args.out, FLOAT_FORMAT)
        else:
            df.to_csv(sys.stdout, index=False, float_format=FLOAT_FORMAT)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    n_faces = int((df.face >= 0).sum())
    unreadable = int(((df.face < 0) & ~df.note.str.startswith(NO_FACE)).sum())
    no_face = int(df.note.str.startswith(NO_FACE).sum())
    where = f" -> {args.out}" if args.out else ""
    print(
        f"{len(paths)} photos: {n_faces} faces, {no_face} without a face, {unreadable} unreadable{where}",
        file=sys.stderr,
    )
    return 0
