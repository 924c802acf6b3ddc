"""Frozen-trunk cache: a phase that keeps the first k backbone stages frozen runs them once over the images
and trains (and validates) the rest of the network on their stored outputs.

Augmentation in cached phases comes from views: the trunk outputs of whole augmented images (view 0 the image
itself, view 1 its mirror image, views 2+ the config's training augmentation with fixed seeds), computed once;
each epoch gives every training image one of its views at random. While the frozen prefix still holds the
weights the model started from, the outputs do not depend on the fold: they are computed once for all images
and stored under data.cache_dir, keyed by the images, the prefix weights and the view, and shared by every fold
(and every later run)."""

from __future__ import annotations

import hashlib
import time
from functools import cached_property
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from tqdm import tqdm

from ..core.config import Phase, TrainConfig
from ..core.files import atomic_path, remove_stale_temporaries
from ..models.network import AgeGenderNet
from ..models.stages import evaluating, frozen_prefix_length, trunk_stages
from .job import autocast
from .loader import (
    FaceDataset,
    LoaderSettings,
    auto_workers,
    make_loader,
    to_model_input,
    train_transform,
    training_batches,
)

STORE_VERSION = 1
STORE_BATCH = 128  # the batch size of trunk passes (augmented views are seeded per batch)


def placement(nbytes: int, device: torch.device, share: float) -> str:
    """Where a phase's cached trunk outputs live: "gpu" when they take at most `share` of the GPU's free memory,
    else "pinned" (host memory, each batch gathered into pinned memory and copied asynchronously); "host" on CPU."""
    if device.type != "cuda":
        return "host"
    free, _ = torch.cuda.mem_get_info(device)
    return "gpu" if nbytes <= share * free else "pinned"


class TrunkCut:
    """The network above the first k trunk stages, run on their outputs (CachedTrunk, StoredViews)."""

    def __init__(self, k: int, channels_last: bool = False):
        self.k = k
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, model: AgeGenderNet, outputs: torch.Tensor, raw: bool = True):
        h = outputs.to(model.mean.device, non_blocking=True).float()
        if h.ndim == 4:  # the layout of the model's weights (stored outputs are plain NCHW)
            h = h.contiguous(memory_format=self.memory_format)
        for stage in trunk_stages(model)[self.k :]:
            h = stage(h)
        return model.heads(h, raw)


class CachedTrunk(TrunkCut):
    """Outputs of a phase's frozen trunk prefix (eval mode): `views` x training rows, and the validation rows
    (view 0), reused by every epoch of the phase."""

    def __init__(self, k: int, views: torch.Tensor, val: torch.Tensor, channels_last: bool = False):
        super().__init__(k, channels_last)
        self.views, self.val = views, val
        self.where = "host"

    def place(self, device: torch.device, share: float) -> CachedTrunk:
        """Move the outputs where placement() says (on CPU they stay)."""
        self.where = placement((self.views.numel() + self.val.numel()) * self.views.element_size(), device, share)
        if self.where == "gpu":
            self.views, self.val = self.views.to(device), self.val.to(device)
        return self

    def batches(self, age: np.ndarray, gender: np.ndarray, batch_size: int, seed: int):
        """Shuffled training batches (trunk outputs of a random view of each image, age, gender); the same
        batch count as the image loader."""
        n_views, n = self.views.shape[:2]
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g)
        view = torch.randint(n_views, (n,), generator=g)
        flat, device = self.views.flatten(0, 1), self.views.device  # row v * n + i: view v of image i
        pick = (view * n + torch.arange(n)).to(device)
        age_t, gender_t = torch.from_numpy(age).to(device), torch.from_numpy(gender).to(device)
        n_used = min(n, training_batches(n, batch_size) * batch_size)
        for i in range(0, n_used, batch_size):
            idx = order[i : i + batch_size].to(device)
            out = None
            if self.where == "pinned":  # the caching host allocator reuses a buffer once its copy has finished
                out = torch.empty((len(idx), *flat.shape[1:]), dtype=flat.dtype, pin_memory=True)
            yield torch.index_select(flat, 0, pick[idx], out=out), age_t[idx], gender_t[idx]


class StoredViews(TrunkCut):
    """The stored outputs at cut k of all the store's images (stored_tta_inputs): one read-only array per TTA view,
    indexed by image."""

    def __init__(self, k: int, views: list[np.ndarray], channels_last: bool = False):
        super().__init__(k, channels_last)
        self.views = views


def view_transform(t: TrainConfig, view: int) -> A.Compose | None:
    """View 0: the image; 1: its mirror image; 2+: the training augmentation, seeded by the view."""
    if view == 0:
        return None
    if view == 1:
        return A.Compose([A.HorizontalFlip(p=1.0)])
    return train_transform(t, t.seed * 1000 + view)


def view_ids(t: TrainConfig) -> list[int]:
    """The views of train.trunk_views (the mirror view only when train.hflip > 0)."""
    return [v for v in range(t.trunk_views) if v != 1 or t.hflip > 0]


class TrunkStore:
    """The stored trunk outputs of all `images` in `folder`, their views made by train config `t` and computed
    under autocast `precision` (None: fp32); one file per cut, view and prefix weights."""

    def __init__(self, folder: str | Path, images: np.ndarray, t: TrainConfig, precision: torch.dtype | None = None):
        self.folder, self.images, self.t, self.precision = Path(folder), images, t, precision

    @cached_property
    def images_key(self) -> str:
        return _digest([self.images])

    def holds_some(self, k: int, view: int) -> bool:
        """Whether the folder holds outputs at cut k for this view and these images' size (from any weights)."""
        return any(self.folder.glob(f"trunk-{self.images.shape[1]}px-k{k}-view{view}-*.npy"))

    def path(self, stages, k: int, view: int) -> Path:
        """Where the outputs of the first k `stages` for one view are stored: keyed by the images, the prefix
        weights, the view, the autocast precision and the torch thread count (CPU results depend on it)."""
        prefix = [p.detach().cpu().numpy() for s in stages[:k] for p in [*s.parameters(), *s.buffers()]]
        spec = f"v{STORE_VERSION}|{k}|{view}|{view_transform(self.t, view)!r}|{torch.get_num_threads()}"
        spec += f"|{self.precision}" if self.precision is not None else ""  # fp32 keys are those of earlier versions
        key = _digest([*prefix, np.frombuffer(f"{spec}|{self.images_key}".encode(), np.uint8)])
        return self.folder / f"trunk-{self.images.shape[1]}px-k{k}-view{view}-{key}.npy"


def _digest(arrays) -> str:
    h = hashlib.sha1()
    for array in arrays:
        a = np.ascontiguousarray(array)
        h.update(f"{a.dtype}{a.shape}".encode())
        flat = a.reshape(-1).view(np.uint8)
        for i in range(0, len(flat), 1 << 26):
            h.update(flat[i : i + (1 << 26)])
    return h.hexdigest()[:16]


class TrunkCache:
    """Frozen-trunk outputs shared by a fold's head / last:N phases. The prefix is computed once at the
    deepest cut that the coming cached phases need; a later phase with a shallower trainable part derives its
    inputs from it (running only the stages in between), as long as those stages have not been trained since.

    While no stage of the prefix has been trained in this fold, its outputs for all of the store's images come
    from the store (computed on first use, then shared by the folds) and are indexed by the fold's `rows` (training,
    validation)."""

    def __init__(
        self, model: AgeGenderNet, store: TrunkStore, rows: tuple[np.ndarray, np.ndarray], device: torch.device
    ):
        self.model, self.store, self.rows, self.device = model, store, rows, device
        self.images, self.t, self.precision = store.images, store.t, store.precision
        self.stages = trunk_stages(model)
        self.base: CachedTrunk | None = None
        self.trained_from: int | None = None  # lowest stage index trained since `base` was computed
        self.lowest_trained: int | None = None  # lowest stage index trained in this fold so far

    def note_trained(self, k: int) -> None:
        """A phase that kept the first k stages frozen has run (also one that finished before a resume)."""
        self.trained_from = k if self.trained_from is None else min(self.trained_from, k)
        self.lowest_trained = k if self.lowest_trained is None else min(self.lowest_trained, k)

    def for_phases(self, model: AgeGenderNet, phases: list[Phase], pi: int) -> CachedTrunk | None:
        """Phase pi's cached frozen trunk, computed at the deepest cut the following cached phases need."""
        ahead = [frozen_prefix_length(model, q.unfreeze) for q in phases[pi:]]
        ahead = ahead[: ahead.index(0)] if 0 in ahead else ahead
        return self.for_phase(frozen_prefix_length(model, phases[pi].unfreeze), min(ahead or [0]))

    @torch.no_grad()
    def for_phase(self, k: int, k_min_ahead: int) -> CachedTrunk | None:
        """Cached inputs for a phase that keeps the first k stages frozen (None: no caching)."""
        if self.stages is None or k == 0:
            if self.stages is None and k:
                _say_unsplit(self.model)
            self.note_trained(0)
            return None
        t0 = time.perf_counter()
        if self.base is None or self.base.k > k or _trained_below(self.trained_from, k):
            self.base = self._base(min(k, k_min_ahead))
            self.trained_from = None
        if self.base.k == k:
            trunk = self.base
        elif not _trained_below(self.lowest_trained, k):  # still the starting weights up to k: derived once, stored
            trunk = self._from_store(k, derive_from=self.base.k)
        else:
            views = torch.stack([self._derive(v, k) for v in self.base.views])
            trunk = CachedTrunk(k, views, self._derive(self.base.val, k), self.t.channels_last)
        self.note_trained(k)
        trunk.place(self.device, self.t.trunk_on_gpu)
        mb = (trunk.views.numel() + trunk.val.numel()) * 2 / 2**20
        where = {"gpu": " on the GPU", "pinned": " in host memory (pinned per batch)", "host": ""}[trunk.where]
        print(
            f"  frozen trunk ({k} stages, {len(trunk.views)} views): {tuple(trunk.val.shape[1:])} per image, "
            f"{mb:.0f} MB{where}, {time.perf_counter() - t0:.0f}s"
        )
        return trunk

    def _base(self, k: int) -> CachedTrunk:
        if not _trained_below(self.lowest_trained, k):  # the prefix holds its starting weights: the same in every fold
            return self._from_store(k)
        tr, va = self.rows
        views = torch.stack([self._run(tr, k, v) for v in view_ids(self.t)])
        return CachedTrunk(k, views, self._run(va, k, 0), self.t.channels_last)

    def _from_store(self, k: int, derive_from: int | None = None) -> CachedTrunk:
        """The fold's rows of the stored outputs at cut k (computed on first use: from the images, or from
        the stored outputs at the shallower cut `derive_from`)."""
        tr, va = self.rows
        stored = [self._stored(k, v, derive_from) for v in view_ids(self.t)]
        views = torch.stack([torch.from_numpy(s[tr]) for s in stored])
        return CachedTrunk(k, views, torch.from_numpy(stored[0][va]), self.t.channels_last)

    def _stored(self, k: int, view: int, derive_from: int | None = None) -> np.ndarray:
        """All images' outputs of the first k stages for one view, from the store (computed on first use)."""
        path = self.store.path(self.stages, k, view)
        if not path.is_file():
            self.store.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.store.folder)
            if derive_from is None:
                out = self._run(np.arange(len(self.images)), k, view)
            else:
                source = torch.from_numpy(np.load(self.store.path(self.stages, derive_from, view)))
                out = self._derive(source, k, derive_from)
            with atomic_path(path) as tmp:
                np.save(tmp, out.numpy())
        return np.load(path, mmap_mode="r")

    def _run(self, rows: np.ndarray, k: int, view: int) -> torch.Tensor:
        out = []
        ds = FaceDataset(self.images, rows, transform=view_transform(self.t, view))
        settings = LoaderSettings(auto_workers(self.t.num_workers), pin_memory=self.device.type == "cuda")
        loader = make_loader(ds, STORE_BATCH, train=False, seed=view, settings=settings)
        with evaluating(self.model), autocast(self.device, self.precision):
            for x, _, _ in tqdm(loader, desc=f"frozen trunk view {view}", unit="batch", leave=False, disable=None):
                h = (to_model_input(x, self.device).float() - self.model.mean) / self.model.std
                for stage in self.stages[:k]:
                    h = stage(h)
                out.append(h.to(torch.float16).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float16)

    def _derive(self, base: torch.Tensor, k: int, base_k: int | None = None) -> torch.Tensor:
        """Outputs at cut k from outputs at the shallower cut base_k (default: the base's)."""
        if len(base) == 0:
            return base
        out = []
        with autocast(self.device, self.precision):
            for i in range(0, len(base), STORE_BATCH):
                h = base[i : i + STORE_BATCH].to(self.device).float()
                for stage in self.stages[(self.base.k if base_k is None else base_k) : k]:
                    h = stage(h)
                out.append(h.to(torch.float16).cpu())
        return torch.cat(out)


def _trained_below(lowest_trained: int | None, k: int) -> bool:
    """Whether a stage below cut k was trained (lowest_trained: the lowest trained stage index; None: none)."""
    return lowest_trained is not None and lowest_trained < k


_UNSPLIT_SAID: set[str] = set()


def _say_unsplit(model: AgeGenderNet) -> None:
    kind = type(model.backbone).__name__
    if kind not in _UNSPLIT_SAID:
        _UNSPLIT_SAID.add(kind)
        print(f"  {kind} backbones do not split into stages: frozen phases run the whole trunk every epoch (no cache)")


STORED_VIEW_OF_TTA = {"none": 0, "hflip": 1}  # the stored view that is the input of each of these TTA views


def stored_tta_inputs(model: AgeGenderNet, store: TrunkStore, tta) -> StoredViews | None:
    """The stored trunk outputs of all the store's images for each TTA view, at the deepest cut whose prefix still
    holds this model's weights (a phase that trained the prefix makes another key); None when the store lacks them
    or a TTA view is no stored view."""
    stages = trunk_stages(model)
    if stages is None or any(name not in STORED_VIEW_OF_TTA for name in tta):
        return None
    views = [STORED_VIEW_OF_TTA[name] for name in tta]
    for k in range(len(stages) - 2, 0, -1):  # below the last stage (stages end with the neck)
        if not all(store.holds_some(k, v) for v in views):
            continue
        paths = [store.path(stages, k, v) for v in views]
        if all(p.is_file() for p in paths):
            return StoredViews(k, [np.load(p, mmap_mode="r") for p in paths], store.t.channels_last)
    return None
