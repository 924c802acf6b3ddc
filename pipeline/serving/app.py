"""The web page of predict-images: drop photos, see every face boxed with its age (and its interval) and gender, a
table, its CSV; optionally "is this person at least N years old?" (yes / no / unsure) per face.
`python -m pipeline app BUNDLE [--host 127.0.0.1] [--port N] [--max-file-size MB]`.

Nothing leaves the machine: the page is served on 127.0.0.1 unless --host says otherwise, with no share link,
no analytics or update checks, no run history, and system fonts only (Gradio's stock themes name web fonts)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from ..core.calibration import min_age_answer
from ..core.errors import DataError, PipelineError
from ..core.files import write_csv
from ..data import faces
from . import photos

if TYPE_CHECKING:
    from .bundle import RunnersFactory

# Read by gradio and huggingface_hub when they are imported or launched: no telemetry, no calls home.
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "GRADIO_MCP_SERVER": "False",
    "GRADIO_RUN_HISTORY": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
LOOPBACK = "127.0.0.1,localhost,::1"
SHOW_SIDES = (480, 1280)  # photos are shown with their boxes at a longest side in this range
BOX_COLOUR = (255, 200, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX
TABLE = ["file", "face", "box", "score", "age", "gender prob", "gender"]
# CSS font-family entries, as written (a multi-word name needs its quotes)
SYSTEM_FONTS = ["system-ui", "-apple-system", "'Segoe UI'", "Roboto", "'Helvetica Neue'", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "'DejaVu Sans Mono'", "monospace"]


@dataclass
class Photo:
    """One uploaded photo as the page shows it."""

    image: np.ndarray  # the photo resized for the page (no boxes)
    scale: float  # the page's size over the photo's
    found: list[dict]  # the predict-images rows of its faces
    caption: str


@dataclass
class Result:
    """What the page shows for one upload (kept per browser tab: a new "at least" age redraws it)."""

    photos: list[Photo] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # predict-images rows of every file
    lines: list[str] = field(default_factory=list)  # one status line per file
    problems: list[str] = field(default_factory=list)  # the lines that are warnings


def analyse(bundle, paths: list[str], detect_size: int = faces.DETECT_MAX_SIDE) -> Result:
    """Every uploaded file: decoded, its faces found and predicted (predict-images' own code), resized for the page."""
    out = Result()
    for path in paths:
        name = Path(path).name
        try:
            rgb = photos.read_photo(path)
        except DataError as e:
            out.rows.append(photos.unreadable_row(name, e))
            out.lines.append(f"{name}: {e}")
            out.problems.append(out.lines[-1])
            continue
        rows = photos.predict_image(bundle, name, rgb, detect_size=detect_size)
        out.rows.extend(rows)
        found = [r for r in rows if r["face"] >= 0]
        line = f"{name}: {len(found)} face{'s' * (len(found) > 1)}" if found else f"{name}: {rows[0]['note']}"
        out.lines.append(line)
        if not found:
            out.problems.append(line)
        out.photos.append(Photo(*page_image(rgb), found, line))
    return out


def asked_age(bundle, min_age: float | None) -> float | None:
    """The page's "at least this old?" age; None when it is off (0 or empty) or the bundle has no intervals."""
    return min_age if min_age and min_age > 0 and bundle.calibration is not None else None


def gender_text(row: dict) -> str:
    label = row.get("gender_label")
    return str(label) if isinstance(label, str) else str(row["gender"])


def age_text(row: dict) -> str:
    """The age with its interval in whole years of age, "34 (28-41)"; floored, as ages are told (17.6 is 17 years
    old), so that an interval shown from 18 up is what answers "at least 18?" with yes and the age never falls
    outside its interval; "34" from a bundle without intervals."""
    if "age_low" not in row:
        return f"{math.floor(row['age'])}"
    return f"{math.floor(row['age'])} ({math.floor(row['age_low'])}-{math.floor(row['age_high'])})"


def min_age_text(row: dict, min_age: float | None) -> str:
    """yes / no / unsure: is this face at least min_age? ("" when not asked or without an interval)"""
    if min_age is None or "age_low" not in row:
        return ""
    return str(min_age_answer(row["age_low"], row["age_high"], min_age))


def label_text(row: dict, min_age: float | None = None) -> str:
    """A box's label: "34 (28-41), female", then ", 18+: unsure" when the page asks."""
    text = f"{age_text(row)}, {gender_text(row)}"
    answer = min_age_text(row, min_age)
    return f"{text}, {min_age:g}+: {answer}" if answer else text


def page_image(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The photo resized for the page (longest side in SHOW_SIDES), and that scale."""
    longest = max(rgb.shape[:2])
    scale = min(SHOW_SIDES[1], max(SHOW_SIDES[0], longest)) / longest
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR), scale


def draw(photo: Photo, min_age: float | None = None) -> np.ndarray:
    """The photo as the page shows it, each face's box drawn with its label_text above it."""
    img = photo.image.copy()
    thick = max(1, round(max(img.shape[:2]) / 500))
    font_scale = max(0.5, max(img.shape[:2]) / 1400)
    for row in photo.found:
        x, y, w, h = (round(row[k] * photo.scale) for k in ("x", "y", "w", "h"))
        cv2.rectangle(img, (x, y), (x + w, y + h), BOX_COLOUR, thick)
        text = label_text(row, min_age)
        (tw, th), base = cv2.getTextSize(text, FONT, font_scale, thick)
        height = th + base + 2 * thick
        top = y - height if y >= height else y + h  # above the box, or under it at the photo's top edge
        cv2.rectangle(img, (x, top), (x + tw + 2 * thick, top + height), BOX_COLOUR, -1)
        cv2.putText(img, text, (x + thick, top + thick + th), FONT, font_scale, (0, 0, 0), thick, cv2.LINE_AA)
    return img


def shown_table(rows: list[dict], min_age: float | None = None) -> pd.DataFrame:
    """One line per face, rounded for reading: file, face, box (x, y, w, h), score, age (with its interval), gender
    prob, gender, and "at least N" (yes / no / unsure) when the page asks."""
    found = [r for r in rows if r["face"] >= 0]
    columns = TABLE + ([f"at least {min_age:g}"] if min_age is not None else [])
    return pd.DataFrame(
        [
            [
                r["file"],
                r["face"],
                ", ".join(f"{r[k]:.0f}" for k in ("x", "y", "w", "h")),
                round(r["score"], 2),
                age_text(r),
                round(r["gender_prob"], 3),
                gender_text(r),
            ]
            + ([min_age_text(r, min_age)] if min_age is not None else [])
            for r in found
        ],
        columns=columns,
    )


def write_table(rows: list[dict], out_dir: Path, min_age: float | None = None, intervals: bool = False) -> Path:
    """The rows as predict-images writes them (age_low, age_high when `intervals`, at_least_<min_age> when asked), in
    a fresh folder (the page offers it as faces.csv)."""
    path = Path(tempfile.mkdtemp(dir=out_dir)) / "faces.csv"
    write_csv(photos.table(rows, min_age, intervals), path, photos.FLOAT_FORMAT)
    return path


def intro_text(bundle) -> str:
    from .bundle import NAME_THEM, NO_CALIBRATION

    text = (
        "## Age and gender from faces\nDrop or upload photos: each face gets its age and gender.  \n"
        f"Model: {bundle.info.experiment or 'bundle'} ({bundle.runtime} bundle: "
        f"{', '.join(m.name for m in bundle.members)})"
    )
    if bundle.calibration is not None:
        text += f"  \nAges with their {bundle.calibration.level * 100:g}% interval, in years."
    else:
        text += f"  \n{NO_CALIBRATION[0].upper()}{NO_CALIBRATION[1:]}."
    if not bundle.labels_known:
        text += f"  \nNote: {NAME_THEM}."
    return text


def build_page(bundle, out_dir: Path, detect_size: int = faces.DETECT_MAX_SIDE):
    import gradio as gr

    def shown(result: Result | None, min_age: float | None):
        """gallery, table, download button for an upload and the page's "at least" age."""
        if result is None:
            return [], shown_table([]), gr.DownloadButton(visible=False)
        min_age = asked_age(bundle, min_age)
        drawn = [(draw(p, min_age), p.caption) for p in result.photos]
        gallery = gr.Gallery(value=drawn, selected_index=0 if drawn else None)  # opens the first
        csv = write_table(result.rows, out_dir, min_age, bundle.calibration is not None)
        return gallery, shown_table(result.rows, min_age), gr.DownloadButton(value=str(csv), visible=True)

    def on_upload(paths: list[str] | None, min_age: float | None):
        if not paths:
            return None, *shown(None, None), ""
        result = analyse(bundle, paths, detect_size)
        for line in result.problems:
            gr.Warning(line)
        return result, *shown(result, min_age), "\n".join(result.lines)

    with gr.Blocks(title="Age and gender from faces", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(intro_text(bundle), elem_id="intro")
        result = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(
                    label="Photos",
                    file_count="multiple",
                    file_types=list(photos.PHOTO_EXTS),
                    type="filepath",
                    height=260,
                    elem_id="photos",
                )
                min_age = gr.Number(
                    label="At least this old? (years; 0 = off)",
                    value=0,
                    minimum=0,
                    maximum=bundle.info.max_age,
                    visible=bundle.calibration is not None,  # a bundle without intervals cannot answer
                    elem_id="min-age",
                )
                status = gr.Textbox(label="Status", interactive=False, lines=2, max_lines=12, elem_id="status")
                download = gr.DownloadButton("Download CSV", visible=False, elem_id="download")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Faces", height=640, object_fit="contain", elem_id="gallery")
        table = gr.Dataframe(value=shown_table([]), interactive=False, label="Faces found", elem_id="table")
        files.change(on_upload, [files, min_age], [result, gallery, table, download, status], concurrency_limit=1)
        min_age.change(shown, [result, min_age], [gallery, table, download], concurrency_limit=1)
    return page


def add_arguments(p: argparse.ArgumentParser) -> None:
    """agegender app's arguments (orchestration/cli.py adds them to its subcommand)."""
    p.add_argument("bundle", metavar="BUNDLE", help="an exported bundle, its folder or archive (agegender export)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port to serve on (default: 7860, or the next free port)")
    p.add_argument("--max-file-size", type=float, default=20, metavar="MB", help="upload limit per file (default 20)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when there is one")
    photos.add_detect_size(p)


def _offline_env() -> None:
    os.environ.update(OFFLINE_ENV)
    for key in ("NO_PROXY", "no_proxy"):  # Gradio checks its own URL over HTTP: never through a proxy
        os.environ[key] = ",".join(v for v in (os.environ.get(key), LOOPBACK) if v)


def run_cli(args: argparse.Namespace, torch_runners: RunnersFactory | None = None) -> int:
    """agegender app with its parsed arguments (add_arguments); torch_runners (the command passes it) lets a torch
    bundle load."""
    if args.max_file_size <= 0:
        print("error: --max-file-size must be above 0", file=sys.stderr)
        return 2
    from .bundle import load_bundle

    try:
        bundle = load_bundle(args.bundle, device=args.device, torch_runners=torch_runners)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _offline_env()
    with tempfile.TemporaryDirectory(prefix="pipeline-app-") as out_dir:
        page = build_page(bundle, Path(out_dir), args.detect_size)
        try:
            page.launch(
                server_name=args.host,
                server_port=args.port,
                share=False,
                max_file_size=int(args.max_file_size * 1024 * 1024),
                theme=_theme(),
                footer_links=[],
                run_history=False,
                mcp_server=False,
                enable_monitoring=False,
                ssr_mode=False,
                pwa=False,
                quiet=True,
                prevent_thread_lock=True,
            )
        except OSError as e:  # the port is taken, or the address is not this machine's
            print(f"error: cannot serve on {args.host}:{args.port or 7860} ({e})", file=sys.stderr)
            return 2
        print(f"serving {page.local_url} (Ctrl-C stops)", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)  # a plain kill stops it like Ctrl-C: the temporary CSVs go too
        page.block_thread()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _theme():
    import gradio as gr

    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
