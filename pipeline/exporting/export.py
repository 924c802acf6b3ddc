"""Export a blended run as a self-contained bundle: every fold model (safetensors or ONNX), the blend,
the preprocessing, the gender coding and a model card. `pipeline.serving.bundle` loads an ONNX bundle and predicts
(torch-free); `torch_runtime.load_bundle` loads either kind."""

from __future__ import annotations

import json
import sys
import tarfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from ..core.calibration import Calibration
from ..core.config import Config, ModelConfig, load_config
from ..core.errors import DataError, PipelineError
from ..core.files import atomic_folder, atomic_path
from ..core.layout import (
    BEST,
    BLEND,
    CONFIG_YAML,
    DATA_REPORT,
    BlendFile,
    BundleFold,
    BundleInfo,
    BundleModel,
    GenderCoding,
    bundle_name,
    bundle_weights,
    experiment_dir,
    fold_dir,
)
from ..core.metrics import evaluate
from ..core.provenance import git_commit
from ..data.cache import find_faces
from ..data.competition import detect_layout, load_competition
from ..models.backbones import create_model, pretraining
from ..models.tta import TTAFold
from ..serving.bundle import NAME_THEM, UNNAMED, Bundle
from ..serving.kaggle_predict import predict_paths
from .kaggle_export import KAGGLE_PYTHON, export_kaggle, folder_size
from .torch_runtime import load_bundle

FORMATS = ("torch", "onnx")
LOADERS = {"torch": "pipeline.exporting.torch_runtime", "onnx": "pipeline.serving.bundle"}  # for the model card
UTKFACE_LABELS = {"0": "male", "1": "female"}  # UTKFace file names: age_gender_race, gender 0 = male


@dataclass
class FoldState:
    fold: int
    state: dict[str, torch.Tensor]  # AgeGenderNet state dict
    age_mean: float
    age_std: float
    epoch: int | None = None


@dataclass
class ModelFolds:
    """One backbone of the blend as exported: the config that builds it (ModelConfig.from_inference_spec) and its
    fold checkpoints."""

    cfg: ModelConfig
    folds: list[FoldState]

    def fold_module(self, f: FoldState, tta: list[str]) -> TTAFold:
        model = create_model(self.cfg, load_weights=False)
        model.load_state_dict(f.state)
        return TTAFold(model, tta, f.age_mean, f.age_std).eval()


def run_config(config_path: str, overrides: list[str], runs: Path | None = None) -> tuple[Config, Path]:
    """The experiment's own saved config (what it was trained with) and its folder (under `runs`, default runs/)."""
    cfg = load_config(config_path, overrides)
    exp_dir = runs / cfg.experiment if runs is not None else experiment_dir(cfg.experiment)
    saved = exp_dir / CONFIG_YAML
    if not saved.is_file():
        raise PipelineError(f"{exp_dir}: no such experiment; run it first (python -m pipeline run {config_path})")
    return load_config(saved), exp_dir


def collect_members(cfg: Config, exp_dir: Path, blend: BlendFile) -> list[ModelFolds]:
    """Every fold's best checkpoint of every model in the blend."""
    members = []
    for name in blend.age_weights:
        m = cfg.model(name)
        folds = []
        for k in range(cfg.folds.n_splits):
            path = fold_dir(exp_dir, name, k) / BEST
            if not path.is_file():
                raise PipelineError(f"{path}: missing; train --model {name} --fold {k} before exporting")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # our own checkpoint, tensors only
            state = {key: v.contiguous() for key, v in ckpt["model"].items()}
            folds.append(FoldState(k, state, float(ckpt["age_mean"]), float(ckpt["age_std"]), ckpt.get("epoch")))
        members.append(ModelFolds(ModelConfig.from_inference_spec(m.inference_spec(cfg.img_size(m))), folds))
    return members


def gender_labels(cfg: Config) -> tuple[dict[str, str], str, bool]:
    """What the submission's gender 0/1 mean, where that comes from, and whether it is known at all."""
    if cfg.data.gender_labels:
        return dict(zip("01", cfg.data.gender_labels)), "the config's data.gender_labels", True
    try:
        layout = detect_layout(Path(cfg.data.root), cfg.data)
    except (DataError, OSError):
        layout = "unknown"
    if layout == "utkface":
        return dict(UTKFACE_LABELS), "UTKFace file names (age_gender_race_date): 0 = male, 1 = female", True
    return dict(UNNAMED), "unknown: " + NAME_THEM, False


def versions(fmt: str) -> dict[str, str]:
    import safetensors
    import timm

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__}
    out |= {"numpy": np.__version__, "safetensors": safetensors.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        out |= {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    return out


def bundle_info(cfg: Config, exp_dir: Path, blend: BlendFile, members: list[ModelFolds], fmt: str) -> BundleInfo:
    """bundle.json without the weight files (write_bundle adds them)."""
    coding, source, known = gender_labels(cfg)
    report = exp_dir / DATA_REPORT
    data = json.loads(report.read_text()) if report.is_file() else {}
    data.pop("skipped_files", None)  # names of the training files stay with the run
    models = [
        BundleModel(
            spec=m.cfg.inference_spec(m.cfg.img_size),
            mean=(m.folds[0].state["mean"].flatten() / 255).tolist(),  # AgeGenderNet normalises 0..255 pixels
            std=(m.folds[0].state["std"].flatten() / 255).tolist(),
            age_weight=blend.age_weights[m.cfg.name],
            gender_weight=blend.gender_weights[m.cfg.name],
            folds=[BundleFold(f.fold, f.age_mean, f.age_std, f.epoch) for f in m.folds],
        )
        for m in members
    ]
    headline = blend.to_json()
    try:
        calibration, figures = Calibration.split(blend.calibration)
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{exp_dir / BLEND}: its calibration entry is damaged; run blend again") from None
    if calibration is None:
        print(f"note: {exp_dir / BLEND} has no calibration (blended before it): run blend again for age intervals")
    return BundleInfo(
        runtime=fmt,
        experiment=cfg.experiment,
        fit=cfg.data.fit,
        zoom=cfg.data.zoom,
        tta=list(cfg.tta),
        max_age=cfg.data.max_age,
        face_crop=cfg.data.face_crop,
        gender=GenderCoding(blend.threshold, coding, source, known),
        models=models,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        git_commit=git_commit(),
        versions=versions(fmt),
        input="RGB uint8 face crops of any size; each model fits them square (fit), keeps the centred 1/zoom and "
        "resizes to its img_size",
        oof={k: headline[k] for k in ("metric", "cv", "cv_in_sample", "oof_rows", "table", "table_at_0.5")},
        holdout=blend.holdout,
        data=data,
        calibration=calibration,
        calibration_figures=figures,
    )


def write_torch_files(members: list[ModelFolds], out: Path, info: BundleInfo) -> None:
    from safetensors.torch import save_file

    for m, entry in zip(members, info.models):
        for f, fe in zip(m.folds, entry.folds):
            fe.file = bundle_weights(m.cfg.name, f.fold, "torch")
            (out / fe.file).parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in f.state.items()}  # safetensors stores dense tensors only
            save_file(state, str(out / fe.file), metadata={"fold": str(f.fold), "model": m.cfg.name})


def write_onnx_files(members: list[ModelFolds], out: Path, info: BundleInfo) -> None:
    """One ONNX graph per fold. The graph is traced once per model (tracing is slow) and each fold's weights
    replace its named initializers; every fold is then checked against torch on random pixels."""
    import onnxscript

    for m, entry in zip(members, info.models):
        size = m.cfg.img_size
        example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
        first = m.fold_module(m.folds[0], info.tta)
        with redirect_stdout(StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(
                first,
                (example,),
                input_names=["pixels"],
                output_names=["age", "gender_prob"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                dynamo=True,
                optimize=False,
                verbose=False,
            )
        for f, fe in zip(m.folds, entry.folds):
            fold = m.fold_module(f, info.tta)
            program.apply_weights({k: v for k, v in fold.state_dict().items() if k in program.model.graph.initializers})
            proto = onnxscript.optimizer.optimize(program.model_proto)
            fe.file = bundle_weights(m.cfg.name, f.fold, "onnx")
            (out / fe.file).parent.mkdir(parents=True, exist_ok=True)
            (out / fe.file).write_bytes(proto.SerializeToString())
            check_onnx_fold(fold, out / fe.file, size, f"{m.cfg.name} fold {f.fold}")


def check_onnx_fold(fold: TTAFold, path: Path, size: int, what: str) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    age, prob = session.run(None, {"pixels": x})
    with torch.inference_mode():
        t_age, t_prob = fold(torch.from_numpy(x))
    err_age, err_prob = np.abs(age - t_age.numpy()).max(), np.abs(prob - t_prob.numpy()).max()
    if err_age > 1e-3 or err_prob > 1e-5:
        raise PipelineError(f"ONNX export of {what} disagrees with torch (age {err_age:.2g}, prob {err_prob:.2g})")


def model_card(info: BundleInfo) -> str:
    """README.md of the bundle: what it is, how well it did, what it was trained on, where it breaks."""
    oof, data, g = info.oof or {}, info.data or {}, info.gender
    metrics = list(next(iter(oof["table"].values())).keys()) if oof.get("table") else []
    lines = [
        f"# Age and gender model: {info.experiment} ({info.runtime} bundle)",
        "",
        f"Created {info.created} from pipeline commit `{info.git_commit}`.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in (info.versions or {}).items()) + ".",
        "",
        "## What it does",
        "",
        "Predicts age in years and gender from a face crop (RGB). An ensemble of "
        + ", ".join(f"{m.name} ({m.spec['arch']}, {m.img_size} px, {len(m.folds)} folds)" for m in info.models)
        + f"; test-time augmentation {info.tta}; images made square by `{info.fit}` and resized per model; "
        f"face crop setting `{info.face_crop}`. Ages are clipped to [0, {info.max_age:g}].",
        "",
        f"Gender: probability of code 1, decided at threshold {g.threshold:.2f}; codes "
        + ", ".join(f"{k} = {v}" for k, v in g.labels.items())
        + f" ({g.labels_from}).",
        "",
        "Starting weights (check them against a competition's rules): "
        + "; ".join(pretraining(ModelConfig(name=m.name, arch=m.spec["arch"])) for m in info.models)
        + ".",
        "",
        "Blend weights (chosen on out-of-fold predictions): "
        + "; ".join(f"{m.name}: age {m.age_weight:.3f}, gender {m.gender_weight:.3f}" for m in info.models),
        "",
        "## How well (out of fold)",
        "",
        f"{oof.get('oof_rows')} training images, {len(info.models[0].folds)}-fold cross-validation; "
        f"CV {oof.get('metric')} {_figure(oof.get('cv'))} (cross-fitted: each fold blended with weights and a "
        f"threshold fitted on the other folds; the blend fitted on all rows scores {_figure(oof.get('cv_in_sample'))} "
        "on them). Each row at its own OOF-tuned threshold (in-sample):",
        "",
        "| model | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for name, row in (oof.get("table") or {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in metrics) + " |")
    if info.holdout:
        lines += ["", "Held-out test split: " + ", ".join(f"{k} {v:.4f}" for k, v in info.holdout.items())]
    lines += calibration_card(info)
    lines += [
        "",
        "## Training data",
        "",
        f"Dataset `{data.get('dataset', '?')}`: {data.get('train_images', '?')} training images, "
        f"{data.get('test_images', '?')} test images, {data.get('skipped', '?')} skipped "
        f"({', '.join(f'{k}: {v}' for k, v in (data.get('skipped_by_reason') or {}).items()) or 'none'}).",
        "",
        "## Intended use and limits",
        "",
        "- Input: one face per image, framed as in the training images (tight, roughly aligned crops). With "
        "`face_crop: none` nothing is detected: whole photos, head-and-shoulders portraits or group pictures must "
        "be cropped to the face first, or the predictions collapse toward the mean age.",
        "- Accuracy holds for faces like the training set's; other sources (other cameras, framing, ethnicity mix, "
        "age range) can be much worse. Check on your own labelled sample before relying on it.",
        "- Gender is the binary label of the training data, predicted from appearance; it says nothing about a "
        "person's gender identity. Do not use the outputs for decisions about individuals.",
        "",
        "## Use",
        "",
        "```python",
        f"from {LOADERS[info.runtime]} import load_bundle",
        "bundle = load_bundle('this folder or its archive')",
        "bundle.predict([rgb_face_uint8, ...])  # DataFrame: age, age_low, age_high, gender_prob, gender, gender_label",
        "```",
        "",
        "Weights are safetensors or ONNX files: loading never unpickles anything.",
    ]
    return "\n".join(lines) + "\n"


def calibration_card(info: BundleInfo) -> list[str]:
    """The model card's section on the intervals and the calibrated probability, out of fold and held out."""
    c, figs = info.calibration, info.calibration_figures or {}
    if c is None:
        return ["", "## Intervals", "", "This bundle has no calibration: ages come without intervals."]
    shown = {w: figs[w] for w in ("oof", "holdout") if figs.get(w)}
    names = {"oof": "out of fold (cross-fitted)", "holdout": "held out"}
    lines = [
        "",
        "## Intervals and calibrated probabilities",
        "",
        f"Each age comes with an interval meant to hold the true age {c.level * 100:g}% of the time (split-conformal, "
        f"{len(c.age.edges)} bins of predicted age, fitted on the cross-fitted out-of-fold blend). The gender "
        f"probability shown is rescaled ({c.gender.method}; out-of-fold log-loss of each tried: "
        + ", ".join(f"{k} {v:.4f}" for k, v in (figs.get("chosen_by") or {}).items())
        + "); the gender decision is the submission's (the probabilities' mean at the threshold), so near it the "
        "probability shown may fall on the other side of 0.5.",
    ]
    if not shown:
        return lines
    n = next(iter(shown.values()))["min_age"]["threshold"]
    lines += [
        "",
        f"| rows | coverage | mean width (years) | gender ECE before -> after | yes among under {n:g} | "
        f"no among {n:g}+ | unsure |",
        "|---" * 7 + "|",
    ]
    for where, f in shown.items():
        m, g = f["min_age"], f["gender"]
        lines.append(
            f"| {names[where]}: {f['rows']} | {f['coverage']:.3f} | {f['width']:.1f} | {g['ece_before']:.4f} -> "
            f"{g['ece_after']:.4f} | {_figure(m['yes_among_under'])} | {_figure(m['no_among_over'])} | "
            f"{m['unsure']:.4f} |"
        )
    lines += ["", "Coverage / mean width by true age band:", ""]
    lines += ["| age | " + " | ".join(names[w] for w in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for band in next(iter(shown.values()))["by_age"]:
        cells = [f["by_age"].get(band) for f in shown.values()]
        lines.append(
            f"| {band} | " + " | ".join(f"{x['coverage']:.3f} / {x['width']:.1f}" if x else "–" for x in cells) + " |"
        )
    return lines


def _figure(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def write_bundle(members: list[ModelFolds], info: BundleInfo, out: Path, archive_root: str) -> Path:
    """Write the bundle folder `out` (replacing an older one only once the new one is complete) and its
    .tar.gz beside it. Returns the archive's path."""
    with atomic_folder(out) as tmp:
        (write_onnx_files if info.runtime == "onnx" else write_torch_files)(members, tmp, info)
        info.write(tmp)
        (tmp / "README.md").write_text(model_card(info))
    archive = out.parent / f"{archive_root}.tar.gz"
    with atomic_path(archive) as part, tarfile.open(part, "w:gz", compresslevel=6) as tar:
        tar.add(out, arcname=archive_root)
    return archive


def export(cfg: Config, exp_dir: Path, fmt: str = "torch") -> tuple[Path, Path]:
    """Bundle a blended run: runs/<exp>/bundle (or bundle-onnx) and its archive. Returns (folder, archive)."""
    if fmt not in FORMATS:
        raise PipelineError(f"format={fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
    blend = BlendFile.read(exp_dir)  # refused in one line when the run is not blended
    members = collect_members(cfg, exp_dir, blend)
    info = bundle_info(cfg, exp_dir, blend, members, fmt)
    name = bundle_name(fmt)
    archive = write_bundle(members, info, exp_dir / name, f"{cfg.experiment}-{name}")
    load_bundle(exp_dir / name)  # the bundle must load before we call it done
    return exp_dir / name, archive


def holdout_from_bundle(bundle: Bundle, cfg: Config, chunk: int = 256) -> dict[str, float]:
    """The run's held-out figures (blend.json "holdout") recomputed by the bundle from the held-out image files."""
    comp = load_competition(cfg)
    if comp.holdout_labels is None:
        raise PipelineError("this run has no held-out split (data.holdout=0)")
    paths = comp.test.path.tolist()
    found = find_faces(paths, cfg.data.cache_folder, f"{comp.name}-test") if cfg.data.face_crop == "detect" else None
    pred = predict_paths(bundle, paths, cfg.data.fit, found, chunk)
    h = comp.holdout_labels
    return evaluate(
        h.age.to_numpy(float), pred.age.to_numpy(float), h.gender.to_numpy(int), pred.gender.to_numpy(float), 0.5
    )


def export_cli(
    config_path: str, overrides: list[str], fmt: str = "torch", python: str | None = None, wheels: str = ""
) -> int:
    """`agegender export CONFIG [--format torch|onnx|kaggle] [--python 3.12] [--wheels DIR] [key=value ...]`
    (orchestration/cli.py parses it): python (the wheels' Python, default Kaggle's) and wheels (a local wheelhouse
    instead of the package index) are for kaggle. A data.gender_labels override names the gender codes."""
    cfg, exp_dir = run_config(config_path, overrides)
    named = [item for item in overrides if item.partition("=")[0] == "data.gender_labels"]
    if named:  # the run's own config, with the codes' names given now (checked by the config)
        cfg = load_config(exp_dir / CONFIG_YAML, named)
    t0 = time.perf_counter()
    folder, archive = export(cfg, exp_dir, "onnx" if fmt == "kaggle" else fmt)
    if fmt == "kaggle":
        out = export_kaggle(cfg, exp_dir, folder, python or KAGGLE_PYTHON, wheels)
        size = folder_size(out) / 2**20
        print(
            f"exported the Kaggle dataset in {time.perf_counter() - t0:.0f}s: {out} ({size:.0f} MiB); see its README.md"
        )
    else:
        print(f"exported {fmt} bundle in {time.perf_counter() - t0:.0f}s: {folder} and {archive}")
    if not gender_labels(cfg)[2]:
        print(f"note: {NAME_THEM}")
    return 0
