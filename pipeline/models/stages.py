"""The backbone as stages, per family: what gradual unfreezing (`last:N`) and the frozen-trunk cache need.

A splittable backbone is a plain chain, stem first, whose composition is the model's own forward_features +
pooling (timm's forward_head(..., pre_logits=True)), then a neck: the part after the pooled features that trains
with the heads (ConvNeXt's and ViT's pre-logits norm; nothing elsewhere). A stage per family:

- EfficientNet / MobileNetV2 / MobileNetV3: the stem, then each block group `blocks.i` (the last one with the
  1x1 head conv and pooling);
- ResNet / ResNeXt / SE-ResNet: the stem (conv1 .. maxpool), then layer1 .. layer4 (the last with pooling);
- ConvNeXt / ConvNeXtV2: the stem, then stages.0 .. stages.3 (the last with pooling); head.norm is the neck;
- RegNet: the stem, then s1 .. s4 (the last with final_conv and pooling);
- ViT / DeiT: the patch and position embedding, then each transformer block; the final norm is the neck;
- the scratch CNN: the stem, then its four conv stages.

Any other backbone is trained without the cache (said once, when its first cached phase starts), its stages
from timm's coarse group matcher."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from timm.layers import NormMlpClassifierHead
from timm.models import group_parameters
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..core.config import Unfreeze
from .backbones import ScratchCNN
from .network import AgeGenderNet


class _ViTEmbed(nn.Module):
    """A ViT's patch embedding, class / register tokens and position embedding (its own _pos_embed), as one stage.
    The token parameters are the ViT's own tensors, registered here too so that they count with this stage."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.patch_embed, self.patch_drop, self.norm_pre = vit.patch_embed, vit.patch_drop, vit.norm_pre
        tokens = (vit.cls_token, vit.reg_token, vit.pos_embed)
        self.tokens = nn.ParameterList([p for p in tokens if isinstance(p, nn.Parameter)])
        self._pos_embed = vit._pos_embed  # a bound method: the ViT itself is not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))


class _ViTPool(nn.Module):
    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self._pool = vit.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(x)


def _chain(b: nn.Module) -> tuple[list[nn.Module], nn.Module] | None:
    """(stages, neck) of a backbone family that splits; None otherwise."""
    seq = nn.Sequential
    if isinstance(b, EfficientNet):
        return [seq(b.conv_stem, b.bn1), *b.blocks[:-1], seq(b.blocks[-1], b.conv_head, b.bn2, b.global_pool)], None
    if isinstance(b, MobileNetV3):  # pooling comes before its 1x1 head conv
        last = seq(b.blocks[-1], b.global_pool, b.conv_head, b.norm_head, b.act2, b.flatten)
        return [seq(b.conv_stem, b.bn1), *b.blocks[:-1], last], None
    if isinstance(b, ResNet):
        stem = seq(b.conv1, b.bn1, b.act1, b.maxpool)
        return [stem, b.layer1, b.layer2, b.layer3, seq(b.layer4, b.global_pool)], None
    if isinstance(b, ConvNeXt) and isinstance(b.head, NormMlpClassifierHead):
        last = seq(b.stages[-1], b.norm_pre, b.head.global_pool)
        return [b.stem, *b.stages[:-1], last], seq(b.head.norm, b.head.flatten, b.head.pre_logits)
    if isinstance(b, RegNet):
        return [b.stem, b.s1, b.s2, b.s3, seq(b.s4, b.final_conv, b.head.global_pool, b.head.flatten)], None
    if type(b) is VisionTransformer and b.attn_pool is None and (b.global_pool == "token" or _identity(b.norm)):
        # the norm is per token, so it commutes with taking the class token; with average pooling it is fc_norm
        return [_ViTEmbed(b), *b.blocks[:-1], seq(b.blocks[-1], _ViTPool(b))], seq(b.norm, b.fc_norm)
    if isinstance(b, ScratchCNN):
        return [b.stem, *b.stages[:-1], seq(b.stages[-1], b.pool, nn.Flatten(1))], None
    return None


def _identity(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity)


def trunk_stages(model: AgeGenderNet) -> list[nn.Module] | None:
    """The backbone as a chain: one module per stage (stem first, the last ending in the pooled features), then the
    neck (nn.Identity when the family has none), so that a frozen prefix can be run once and cached. None for
    backbones that do not split."""
    chain = _chain(model.backbone)
    if chain is None:
        return None
    stages, neck = chain
    return [*stages, neck or nn.Identity()]


def splits(model: AgeGenderNet) -> bool:
    return _chain(model.backbone) is not None


def backbone_groups(model: AgeGenderNet) -> list[list[str]]:
    """Backbone parameter names per stage (stem first); the neck's parameters are in none (they train with the
    heads). Backbones that do not split: timm's coarse group matcher."""
    b = model.backbone
    chain = _chain(b)
    if chain is None:
        groups = group_parameters(b, b.group_matcher(coarse=True))
        return [names for _, names in sorted(groups.items(), key=lambda kv: kv[0])]
    name_of = {id(p): n for n, p in b.named_parameters()}
    return [[name_of[id(p)] for p in stage.parameters()] for stage in chain[0]]


def frozen_prefix_length(model: AgeGenderNet, unfreeze: Unfreeze) -> int:
    """How many backbone stages (stem first) a phase keeps frozen."""
    return unfreeze.frozen_prefix(len(backbone_groups(model)))


def set_trainable(model: AgeGenderNet, unfreeze: Unfreeze) -> int:
    """Frozen modules go to eval mode (fixed BatchNorm statistics) and lose requires_grad, so autograd
    builds no graph through a frozen prefix. Returns the number of trainable parameters."""
    groups = backbone_groups(model)
    frozen = {f"backbone.{n}" for g in groups[: unfreeze.frozen_prefix(len(groups))] for n in g}
    for name, p in model.named_parameters():
        p.requires_grad = name not in frozen
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
