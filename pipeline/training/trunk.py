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
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from tqdm import tqdm

from ..core.config import TrainConfig
from ..core.files import atomic_path, remove_stale_temporaries
from ..models.network import AgeGenderNet
from ..models.stages import evaluating, trunk_stages
from .job import Inference, autocast
from .loader import FaceDataset, auto_workers, make_loader, to_model_input, train_transform, training_batches

STORE_VERSION = 1
STORE_BATCH = 128  # the batch size of trunk passes (augmented views are seeded per batch)


def placement(nbytes: int, device: torch.device, share: float) -> str:
    """Where a phase's cached trunk outputs live: "gpu" when they take at most `share` of the GPU's free memory,
    else "pinned" (host memory, each batch gathered into pinned memory and copied asynchronously); "host" on CPU."""
    if device.type != "cuda":
        return "host"
    free, _ = torch.cuda.mem_get_info(device)
    return "gpu" if nbytes <= share * free else "pinned"


class CachedTrunk:
    """Outputs of a phase's frozen trunk prefix (eval mode): `views` x training rows, and the validation rows
    (view 0), reused by every epoch of the phase."""

    def __init__(self, k: int, views: torch.Tensor, val: torch.Tensor, channels_last: bool = False):
        self.k, self.views, self.val = k, views, val
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.where = "host"

    def place(self, device: torch.device, share: float) -> CachedTrunk:
        """Move the outputs where placement() says (on CPU they stay)."""
        self.where = placement((self.views.numel() + self.val.numel()) * self.views.element_size(), device, share)
        if self.where == "gpu":
            self.views, self.val = self.views.to(device), self.val.to(device)
        return self

    def forward(self, model: AgeGenderNet, h: torch.Tensor, raw: bool = True):
        h = h.to(model.mean.device, non_blocking=True).float()
        if h.ndim == 4:  # the layout of the model's weights (stored outputs are plain NCHW)
            h = h.contiguous(memory_format=self.memory_format)
        for stage in trunk_stages(model)[self.k :]:
            h = stage(h)
        return model.heads(h, raw)

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

    @torch.inference_mode()
    def predict_val(self, model: AgeGenderNet, how: Inference, age_mean: float, age_std: float, loss=None):
        """Validation predictions (no TTA) at the same precision as the uncached path (predict_arrays), summing
        the training objective into `loss` (a LossSum) if given."""
        ages, probs = [], []
        with evaluating(model):
            for i in range(0, len(self.val), how.batch_size):
                with autocast(how.device, how.amp):
                    out = self.forward(model, self.val[i : i + how.batch_size], raw=loss is not None)
                    a, g = out if loss is None else loss.take(model, *out)
                ages.append(a.float().cpu().numpy() * age_std + age_mean)
                probs.append(torch.sigmoid(g.float()).cpu().numpy())
        return np.concatenate(ages), np.concatenate(probs)


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


def store_path(
    store_dir: Path, stages, size: int, images_key: str, t: TrainConfig, k: int, view: int, amp=None
) -> Path:
    """Where the outputs of the first k `stages` for one view of the images (digest `images_key`) are stored:
    keyed by the prefix weights, the view, the autocast precision and the torch thread count (CPU results
    depend on it)."""
    prefix = [p.detach().cpu().numpy() for s in stages[:k] for p in [*s.parameters(), *s.buffers()]]
    spec = f"v{STORE_VERSION}|{k}|{view}|{view_transform(t, view)!r}|{torch.get_num_threads()}"
    spec += f"|{amp}" if amp is not None else ""  # fp32 keys are those of earlier versions
    key = _digest([*prefix, np.frombuffer(f"{spec}|{images_key}".encode(), np.uint8)])
    return Path(store_dir) / f"trunk-{size}px-k{k}-view{view}-{key}.npy"


def _digest(arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        flat = a.reshape(-1).view(np.uint8)
        for i in range(0, len(flat), 1 << 26):
            h.update(flat[i : i + (1 << 26)])
    return h.hexdigest()[:16]


class TrunkCache:
    """Frozen-trunk outputs shared by a fold's head / last:N phases. The prefix is computed once at the
    deepest cut that the coming cached phases need; a later phase with a shallower trainable part derives its
    inputs from it (running only the stages in between), as long as those stages have not been trained since.

    While no stage of the prefix has been trained in this fold, its outputs for all images come from the
    store in `store_dir` (computed on first use, then shared by the folds) and are indexed by the fold's rows."""

    def __init__(self, model: AgeGenderNet, images, tr_rows, va_rows, t: TrainConfig, device, store_dir: str, amp=None):
        self.model, self.images, self.rows = model, images, (tr_rows, va_rows)
        self.t, self.device, self.store_dir, self.amp = t, device, Path(store_dir), amp
        self.stages = trunk_stages(model)
        self.base: CachedTrunk | None = None
        self.trained_from = 10**9  # lowest stage index trained since `base` was computed
        self.lowest_trained = 10**9  # lowest stage index trained in this fold so far
        self._images_key = ""

    def note_trained(self, k: int) -> None:
        """A phase that kept the first k stages frozen has run (also one that finished before a resume)."""
        self.trained_from = min(self.trained_from, k)
        self.lowest_trained = min(self.lowest_trained, k)

    @torch.no_grad()
    def for_phase(self, k: int, k_min_ahead: int) -> CachedTrunk | None:
        """Cached inputs for a phase that keeps the first k stages frozen (None: no caching)."""
        if self.stages is None or k == 0:
            if self.stages is None and k:
                _say_unsplit(self.model)
            self.note_trained(0)
            return None
        t0 = time.perf_counter()
        if self.base is None or self.base.k > k or self.trained_from < k:
            self.base = self._base(min(k, k_min_ahead))
            self.trained_from = 10**9
        if self.base.k == k:
            trunk = self.base
        elif self.lowest_trained >= k:  # still the starting weights up to k: derived once for all folds, stored
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
        if self.lowest_trained >= k:  # the prefix holds its starting weights: the same in every fold
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

    def _store_path(self, k: int, view: int) -> Path:
        self._images_key = self._images_key or _digest([self.images])
        size = self.images.shape[1]
        return store_path(self.store_dir, self.stages, size, self._images_key, self.t, k, view, self.amp)

    def _stored(self, k: int, view: int, derive_from: int | None = None) -> np.ndarray:
        """All images' outputs of the first k stages for one view, from the store (computed on first use)."""
        path = self._store_path(k, view)
        if not path.is_file():
            self.store_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.store_dir)
            if derive_from is None:
                out = self._run(np.arange(len(self.images)), k, view)
            else:
                source = torch.from_numpy(np.load(self._store_path(derive_from, view)))
                out = self._derive(source, k, derive_from)
            with atomic_path(path) as tmp:
                np.save(tmp, out.numpy())
        return np.load(path, mmap_mode="r")

    def _run(self, rows: np.ndarray, k: int, view: int) -> torch.Tensor:
        out = []
        ds = FaceDataset(self.images, rows, transform=view_transform(self.t, view))
        workers, cuda = auto_workers(self.t.num_workers), self.device.type == "cuda"
        loader = make_loader(ds, STORE_BATCH, False, workers, seed=view, pin_memory=cuda)
        with evaluating(self.model), autocast(self.device, self.amp):
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
        with autocast(self.device, self.amp):
            for i in range(0, len(base), STORE_BATCH):
                h = base[i : i + STORE_BATCH].to(self.device).float()
                for stage in self.stages[(self.base.k if base_k is None else base_k) : k]:
                    h = stage(h)
                out.append(h.to(torch.float16).cpu())
        return torch.cat(out)


_UNSPLIT_SAID: set[str] = set()


def _say_unsplit(model: AgeGenderNet) -> None:
    kind = type(model.backbone).__name__
    if kind not in _UNSPLIT_SAID:
        _UNSPLIT_SAID.add(kind)
        print(f"  {kind} backbones do not split into stages: frozen phases run the whole trunk every epoch (no cache)")


TTA_VIEWS = {"none": 0, "hflip": 1}  # the stored view that is each TTA view's input


def stored_tta_inputs(
    model: AgeGenderNet, images: np.ndarray, t: TrainConfig, store_dir: str, tta, amp=None
) -> CachedTrunk | None:
    """The stored trunk outputs of all `images` for each TTA view (CachedTrunk.views: one array per TTA view), at
    the deepest cut whose prefix still holds this model's weights (a phase that trained the prefix makes another
    key); None when the store lacks them or a TTA view is no stored view."""
    stages = trunk_stages(model)
    if stages is None or any(name not in TTA_VIEWS for name in tta):
        return None
    views, size, images_key = [TTA_VIEWS[name] for name in tta], images.shape[1], ""
    for k in range(len(stages) - 2, 0, -1):  # below the last stage (stages end with the neck)
        if not all(any(Path(store_dir).glob(f"trunk-{size}px-k{k}-view{v}-*.npy")) for v in views):
            continue
        images_key = images_key or _digest([images])
        paths = [store_path(Path(store_dir), stages, size, images_key, t, k, v, amp) for v in views]
        if all(p.is_file() for p in paths):
            return CachedTrunk(k, [np.load(p, mmap_mode="r") for p in paths], None, t.channels_last)
    return None
