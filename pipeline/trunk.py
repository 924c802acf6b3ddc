"""Frozen-trunk cache: a phase that keeps the first k backbone stages frozen runs them once over the fold's
images and trains (and validates) the rest of the network on their stored outputs."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from .loader import FaceDataset, make_loader, to_model_input, training_batches
from .models import AgeGenderNet, evaluating, trunk_stages
from .predict import Inference


class CachedTrunk:
    """Outputs of a phase's frozen trunk prefix (eval mode, no augmentation), reused by every epoch of the
    phase. Augmentation on them: a random horizontal flip of the feature maps with probability `hflip`."""

    def __init__(self, k: int, train: torch.Tensor, val: torch.Tensor):
        self.k, self.train, self.val = k, train, val

    def forward(self, model: AgeGenderNet, h: torch.Tensor):
        h = h.float()
        for stage in trunk_stages(model)[self.k :]:
            h = stage(h)
        return model.heads(h)

    def batches(self, age: np.ndarray, gender: np.ndarray, batch_size: int, seed: int, hflip: float):
        """Shuffled training batches (feature maps, age, gender); the same batch count as the image loader."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train), generator=g)
        flip = torch.rand(len(self.train), generator=g) < hflip
        age_t, gender_t = torch.from_numpy(age), torch.from_numpy(gender)
        n_used = min(len(order), training_batches(len(order), batch_size) * batch_size)
        for i in range(0, n_used, batch_size):
            idx = order[i : i + batch_size]
            h = self.train[idx]
            if h.ndim == 4:
                h = torch.where(flip[idx].view(-1, 1, 1, 1).to(h.device), h.flip(3), h)
            yield h, age_t[idx], gender_t[idx]

    @torch.inference_mode()
    def predict_val(self, model: AgeGenderNet, how: Inference, age_mean: float, age_std: float):
        """Validation predictions (no TTA) at the same precision as the uncached path (predict_arrays)."""
        ages, probs = [], []
        with evaluating(model):
            for i in range(0, len(self.val), how.batch_size):
                with torch.autocast(how.device.type, dtype=torch.bfloat16, enabled=how.amp):
                    a, g = self.forward(model, self.val[i : i + how.batch_size])
                ages.append(a.float().cpu().numpy() * age_std + age_mean)
                probs.append(torch.sigmoid(g.float()).cpu().numpy())
        return np.concatenate(ages), np.concatenate(probs)


class TrunkCache:
    """Frozen-trunk outputs shared by a fold's head / last:N phases. The prefix is computed once at the
    deepest cut that the coming cached phases need; a later phase with a shallower trainable part derives its
    inputs from it (running only the stages in between), as long as those stages have not been trained since."""

    def __init__(self, model: AgeGenderNet, images: np.ndarray, tr_rows, va_rows, batch_size: int, device):
        self.model, self.images, self.rows = model, images, (tr_rows, va_rows)
        self.batch_size, self.device = batch_size, device
        self.stages = trunk_stages(model)
        self.base: CachedTrunk | None = None
        self.trained_from = 10**9  # lowest stage index trained since `base` was computed

    @torch.no_grad()
    def for_phase(self, k: int, k_min_ahead: int) -> CachedTrunk | None:
        """Cached inputs for a phase that keeps the first k stages frozen (None: no caching)."""
        if self.stages is None or k == 0:
            self.trained_from = 0
            return None
        t0 = time.perf_counter()
        if self.base is None or self.base.k > k or self.trained_from < k:
            k0 = min(k, k_min_ahead)
            self.base = CachedTrunk(k0, self._from_images(self.rows[0], k0), self._from_images(self.rows[1], k0))
            self.trained_from = 10**9
        if self.base.k == k:
            trunk = self.base
        else:
            trunk = CachedTrunk(k, self._derive(self.base.train, k), self._derive(self.base.val, k))
        self.trained_from = min(self.trained_from, k)
        mb = (trunk.train.numel() + trunk.val.numel()) * 2 / 2**20
        print(
            f"  frozen trunk ({k} stages) run once for the phase: {tuple(trunk.train.shape[1:])} per image, "
            f"{mb:.0f} MB, {time.perf_counter() - t0:.0f}s"
        )
        return trunk

    def _from_images(self, rows: np.ndarray, k: int) -> torch.Tensor:
        out = []
        loader = make_loader(FaceDataset(self.images, rows), self.batch_size * 2, False, 0)
        for x, _, _ in tqdm(loader, desc="frozen trunk", unit="batch", leave=False, disable=None):
            h = (to_model_input(x, self.device).float() - self.model.mean) / self.model.std
            for stage in self.stages[:k]:
                h = stage(h)
            out.append(h.to(torch.float16))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float16)

    def _derive(self, base: torch.Tensor, k: int) -> torch.Tensor:
        if len(base) == 0:
            return base
        out = []
        for i in range(0, len(base), self.batch_size * 2):
            h = base[i : i + self.batch_size * 2].float()
            for stage in self.stages[self.base.k : k]:
                h = stage(h)
            out.append(h.to(torch.float16))
        return torch.cat(out)
