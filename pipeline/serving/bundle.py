"""Load an exported ensemble (a bundle folder or its archive) and predict age and gender on face crops.

Loading never unpickles: weights are safetensors (torch bundles) or ONNX (onnx bundles), the rest is JSON.
An onnx bundle needs numpy, pandas, OpenCV and onnxruntime only (requirements-serve.txt). This side never imports
torch: a torch bundle loads when the caller passes `torch_runners` (exporting.torch_runtime.load_bundle does)."""

from __future__ import annotations

import sys
import tarfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ..core.calibration import Calibration, logit
from ..core.cores import usable_cores
from ..core.errors import BundleError, PipelineError
from ..core.layout import BUNDLE_FILE, BundleInfo, BundleModel
from ..data.imaging import square_resize

COLUMNS = ["age", "age_low", "age_high", "gender_prob", "gender", "gender_label"]  # no interval without calibration
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
UNNAMED = {"0": "gender code 0", "1": "gender code 1"}  # what a bundle shows when the codes' names are unknown
NO_CALIBRATION = (
    "this bundle has no calibration (its run was blended before it): ages without intervals, gender probabilities as "
    "the models give them; blend the run again, then export, for intervals"
)
NAME_THEM = (
    "the gender codes' names are unknown: set data.gender_labels: [name of 0, name of 1] as the competition's "
    "page says (an override at export: data.gender_labels=[NAME0,NAME1]) and export again"
)
MAX_BUNDLE_BYTES = 8 << 30  # a bundle of a few dozen fold models is far smaller; refuse an archive bomb

FoldRunner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 N x S x S x 3 -> (age, gender_prob)
# (a model of bundle.json, bundle.json, the bundle's files, its path, device) -> one FoldRunner per fold
RunnersFactory = Callable[[BundleModel, BundleInfo, dict[str, bytes], Path, str], list[FoldRunner]]


def read_bundle_files(path: Path) -> dict[str, bytes]:
    """Every file of a bundle folder or archive, by its path relative to the bundle's root (where bundle.json is)."""
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        if BUNDLE_FILE not in files:
            raise BundleError(
                f"{path}: not a bundle folder (no {BUNDLE_FILE}); export one with python -m pipeline export"
            )
        return {name: p.read_bytes() for name, p in files.items()}
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle folder or archive")
    if not path.name.lower().endswith(ARCHIVES):
        raise BundleError(f"{path}: not a bundle; give a bundle folder or its archive ({', '.join(ARCHIVES)})")
    try:
        members = _zip_members(path) if path.name.lower().endswith(".zip") else _tar_members(path)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise BundleError(f"{path}: damaged or unreadable archive ({e})") from None
    roots = [name[: -len(BUNDLE_FILE)] for name in members if name.rsplit("/", 1)[-1] == BUNDLE_FILE]
    if not roots:
        raise BundleError(f"{path}: not a bundle archive (no {BUNDLE_FILE} inside)")
    root = min(roots, key=len)
    return {name[len(root) :]: data for name, data in members.items() if name.startswith(root)}


def _tar_members(path: Path) -> dict[str, bytes]:
    out, total = {}, 0
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            total += member.size
            if total > MAX_BUNDLE_BYTES:
                raise ValueError(f"more than {MAX_BUNDLE_BYTES >> 30} GiB inside")
            out[member.name] = tar.extractfile(member).read()
    return out


def _zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        if sum(i.file_size for i in infos) > MAX_BUNDLE_BYTES:
            raise ValueError(f"more than {MAX_BUNDLE_BYTES >> 30} GiB inside")
        return {i.filename: z.read(i) for i in infos}


def _onnx_runners(model: BundleModel, files: dict[str, bytes], path: Path, threads: int) -> list[FoldRunner]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError("an onnx bundle needs onnxruntime: pip install 'agegender[serve]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    runners = []
    for f in model.folds:
        try:
            session = ort.InferenceSession(files[f.file], options, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors on a damaged graph
            raise BundleError(f"{path}: {f.file} is not a readable ONNX model ({str(e).splitlines()[0]})") from None
        runners.append(lambda x, s=session: tuple(s.run(["age", "gender_prob"], {"pixels": x})))
    return runners


@dataclass
class Member:
    """One backbone of the blend with its fold runners."""

    name: str
    img_size: int
    age_weight: float
    gender_weight: float
    folds: list[FoldRunner] = field(repr=False)


@dataclass
class Bundle:
    info: BundleInfo
    face_crop: str  # "none" | "detect": whether faces should be detected and cropped before predict
    path: Path
    members: list[Member] = field(repr=False)
    workers: int = 1  # fold models run side by side on this many threads (onnx: one core each)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def runtime(self) -> str:
        return self.info.runtime

    @property
    def zoom(self) -> float:
        return self.info.zoom

    @property
    def threshold(self) -> float:
        return self.info.gender.threshold

    @property
    def labels_known(self) -> bool:
        """Whether the bundle knows what gender codes 0 and 1 mean (data.gender_labels)."""
        g = self.info.gender
        return (
            g.labels_known
            if g.labels_known is not None
            else (g.labels or UNNAMED) not in (UNNAMED, {"0": "0", "1": "1"})
        )

    @property
    def gender_labels(self) -> dict[str, str]:
        return self.info.gender.labels if self.labels_known else dict(UNNAMED)

    @property
    def calibration(self) -> Calibration | None:
        return self.info.calibration

    def predict(self, faces: list[np.ndarray], batch_size: int = 64) -> pd.DataFrame:
        """Age (with its interval when the bundle is calibrated), gender probability, gender (0/1 as in the
        training labels) and its label for RGB uint8 face crops of any size: per model fit square + resize, every
        fold with the TTA views, folds averaged, then blended. The gender decision is the submission's (the
        probabilities' blend at the OOF threshold); the probability shown is the calibrated one."""
        faces = _checked_faces(faces)
        n = len(faces)
        age, prob, z = np.zeros(n), np.zeros(n), np.zeros(n)
        for start in range(0, n, max(1, batch_size)):
            chunk = faces[start : start + batch_size]
            resized = {
                size: np.stack([square_resize(f, size, self.info.fit, self.zoom) for f in chunk])
                for size in dict.fromkeys(m.img_size for m in self.members)
            }
            jobs = [(fold, resized[m.img_size]) for m in self.members for fold in m.folds]
            outs = iter(self._map(lambda job: job[0](job[1]), jobs))
            for m in self.members:
                folds = [next(outs) for _ in m.folds]
                age[start : start + len(chunk)] += m.age_weight * np.mean([np.float64(a) for a, _ in folds], axis=0)
                probs = [np.float64(p) for _, p in folds]
                prob[start : start + len(chunk)] += m.gender_weight * np.mean(probs, axis=0)
                z[start : start + len(chunk)] += m.gender_weight * np.mean([logit(p) for p in probs], axis=0)
        gender = (prob >= self.threshold).astype(int)
        labels = self.gender_labels
        age = np.clip(age, 0, self.info.max_age)
        out = {
            "age": age,
            "gender_prob": prob,
            "gender": gender,
            "gender_label": [labels.get(str(g), str(g)) for g in gender],
        }
        if self.calibration is not None:
            out["age_low"], out["age_high"] = self.calibration.age.bounds(age, self.info.max_age)
            out["gender_prob"] = self.calibration.gender(z)
        return pd.DataFrame(out, columns=[c for c in COLUMNS if c in out])

    def _map(self, fn, jobs: list) -> list:
        """fn over jobs in order; on a thread pool when workers > 1 (onnxruntime releases the GIL)."""
        if self.workers <= 1 or len(jobs) <= 1:
            return [fn(j) for j in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="bundle")
        return list(self._pool.map(fn, jobs))


def _checked_faces(faces) -> list[np.ndarray]:
    if isinstance(faces, np.ndarray) and faces.ndim == 3:
        raise PipelineError("predict takes a list of face images; wrap a single image in a list")
    out = []
    for i, f in enumerate(faces):
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            what = f"{f.dtype} array of shape {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
            raise PipelineError(f"face {i}: expected an RGB uint8 H x W x 3 image, got a {what}")
        if min(f.shape[:2]) == 0:
            raise PipelineError(f"face {i}: empty image ({f.shape[0]} x {f.shape[1]})")
        out.append(np.ascontiguousarray(f))
    return out


def load_bundle(
    path: str | Path,
    device: str = "auto",
    threads: int = 0,
    parallel_folds: bool = True,
    torch_runners: RunnersFactory | None = None,
) -> Bundle:
    """A bundle folder or its archive (.tar.gz, .tgz, .tar, .zip) -> a ready predictor.

    device (torch bundles): auto (CUDA when there is one), cpu or cuda. threads (onnx bundles; 0 = every core):
    with parallel_folds, that many fold models run side by side with one onnxruntime thread each (measured faster
    on 2 cores than one model at a time on every core: small images parallelise poorly inside one model).
    torch_runners builds a torch bundle's fold models; without it a torch bundle is refused in one line."""
    path = Path(path)
    files = read_bundle_files(path)
    info = BundleInfo.from_json(files[BUNDLE_FILE], path)
    for f in (f for m in info.models for f in m.folds):
        if f.file not in files:
            raise BundleError(f"{path}: {f.file} is missing from the bundle")
    if info.runtime != "onnx" and torch_runners is None:
        raise BundleError(
            f"{path} holds torch weights: load it with pipeline.exporting.torch_runtime.load_bundle "
            "(pip install 'agegender[train]'), or export --format onnx for a torch-free bundle"
        )
    threads = threads or usable_cores()
    workers = threads if info.runtime == "onnx" and parallel_folds else 1
    members = []
    for m in info.models:
        if not m.age_weight and not m.gender_weight:
            continue  # weight 0 in both blends: it cannot change a prediction
        if info.runtime == "onnx":
            runners = _onnx_runners(m, files, path, max(1, threads // workers))
        else:
            runners = torch_runners(m, info, files, path, device)
        members.append(Member(m.name, m.img_size, m.age_weight, m.gender_weight, runners))
    if info.calibration is None:
        print(f"note: {path}: {NO_CALIBRATION}", file=sys.stderr)
    return Bundle(info=info, face_crop=info.face_crop, path=path, members=members, workers=workers)


def main(argv: list[str]) -> int:
    """`python -m pipeline.serving.bundle BUNDLE [FACE_IMAGE ...]`: describe a bundle, predict on face-crop files."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m pipeline.serving.bundle BUNDLE [FACE_IMAGE ...]")
        return 0 if argv else 2
    try:
        bundle = load_bundle(argv[0])
        info = bundle.info
        models = ", ".join(f"{m.name} {m.img_size}px x{len(m.folds)}" for m in info.models)
        print(f"{bundle.path}: {info.runtime} bundle of {info.experiment} ({models}); face_crop {bundle.face_crop}")
        faces = [_read_rgb(p) for p in argv[1:]]
        if faces:
            print(bundle.predict(faces).assign(file=argv[1:]).to_string(index=False))
        return 0
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _read_rgb(path: str) -> np.ndarray:
    img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) if Path(path).is_file() else None
    if img is None:
        raise PipelineError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
