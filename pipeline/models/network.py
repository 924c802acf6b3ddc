"""The network every backbone is wrapped in: pixel normalisation, the backbone's pooled features, a gender logit
and an age head (regression, dldl, meanvar or coral). Shared by training and the exported bundles."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

DLDL_MAX_AGE = 120  # the dldl and meanvar heads' distribution covers the whole years 0..120; coral's thresholds 1..120
DISTRIBUTION_HEADS = ("dldl", "meanvar")  # age heads that output logits over the whole years; the age: its mean


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
        n = getattr(backbone, "head_hidden_size", None) or backbone.num_features  # the pooled features' width
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
        """The age and gender heads, in fp32 also under autocast (with the age expectation: a 121-bin softmax or
        CORAL's sum would lose years in bf16)."""
        kind = features.device.type
        with torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else nullcontext():
            f = self.drop(features.float())
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
