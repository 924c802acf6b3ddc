"""Test-time augmentation: the views (TTA_VIEWS in core/choices.py) and one fold as a bundle runs it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .network import AgeGenderNet

TTA_ZOOM = 0.9  # the zoom views keep the central 90% of the image
TTA_SHIFT = 1 / 16  # the shift views move the image by this share of its width, repeating the edge column


def apply_tta(x: torch.Tensor, name: str) -> torch.Tensor:
    """One TTA view of N x 3 x H x W pixels, in the input's dtype (a resampled uint8 view is rounded back, as a
    zoomed photo would be): `none`, `hflip`, `zoom` / `zoom_hflip` (the centre TTA_ZOOM, resized back), `shift_left` /
    `shift_right`. Shared by the predict stage and the exported bundle (TTAFold)."""
    if name.endswith("hflip"):
        x = x.flip(3)
    if name.startswith("zoom") or name.startswith("shift"):
        h, w = x.shape[2:]
        y = x.float()
        if name.startswith("zoom"):
            ch, cw = round(h * TTA_ZOOM), round(w * TTA_ZOOM)
            top, left = (h - ch) // 2, (w - cw) // 2
            y = F.interpolate(
                y[:, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False
            )
        else:
            s = max(1, round(w * TTA_SHIFT))
            y = (
                F.pad(y[..., s:], (0, s, 0, 0), mode="replicate")
                if name == "shift_left"
                else F.pad(y[..., :-s], (s, 0, 0, 0), mode="replicate")
            )
        x = y.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else y.to(x.dtype)
    return x


class TTAFold(nn.Module):
    """One fold as the bundle runs it: uint8 N x H x W x 3 pixels in; raw-scale age and gender probability,
    each averaged over the TTA views, out. The same module runs torch bundles and is exported to ONNX."""

    def __init__(self, model: AgeGenderNet, tta: list[str], age_mean: float, age_std: float):
        super().__init__()
        self.model = model
        self.tta = tuple(tta)
        # buffers, not constants: they become named ONNX initializers that each fold's weights replace
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        x = x.permute(0, 3, 1, 2)
        views = torch.cat([apply_tta(x, t) for t in self.tta])  # one batch for all views
        age, logit = self.model(views)
        age = age.float().reshape(len(self.tta), n).mean(0)
        prob = torch.sigmoid(logit.float()).reshape(len(self.tta), n).mean(0)
        return age * self.age_std + self.age_mean, prob
