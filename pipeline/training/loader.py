"""Batches from the uint8 image cache: albumentations on uint8 HWC, pixels normalised inside the model."""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.config import TrainConfig
from ..core.cores import usable_cores


def train_transform(t: TrainConfig, seed: int) -> A.Compose:
    return A.Compose(
        [
            A.HorizontalFlip(p=t.hflip),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.06, 0.06),
                rotate=(-10, 10),
                border_mode=0,
                p=t.shift_scale_rotate,
            ),
            A.RandomBrightnessContrast(0.2, 0.2, p=t.brightness_contrast),
        ],
        seed=seed,
    )


class FaceDataset(Dataset):
    """Rows of the uint8 image cache with their targets. Batches come from EpochBatches as (seed, index) pairs: the
    augmentation of a batch is seeded by the epoch seed and the batch's first index, so batches are the same
    whatever the number of loader workers, and workers that live across epochs see each epoch's seed."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, age=None, gender=None, transform=None):
        self.images, self.rows, self.transform = images, rows, transform
        self.age = np.zeros(len(rows), np.float32) if age is None else np.asarray(age, np.float32)
        self.gender = np.zeros(len(rows), np.float32) if gender is None else np.asarray(gender, np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, batch: list[tuple[int, int]]) -> list:
        """A whole batch of (epoch seed, index) pairs (the DataLoader calls this, in whichever worker gets it)."""
        if self.transform is not None and batch:
            seed, first = batch[0]
            self.transform.set_random_seed(int(np.random.SeedSequence([seed, first]).generate_state(1)[0]))
        return [self[i] for _, i in batch]

    def __getitem__(self, i: int):
        img = self.images[self.rows[i]]
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        if not img.flags.writeable or not img.flags.c_contiguous:  # memmap rows are read-only
            img = np.ascontiguousarray(img).copy()
        return torch.from_numpy(img), self.age[i], self.gender[i]


class EpochBatches(Sampler):
    """Batches of (epoch seed, index) pairs. train=True: shuffled by the seed, the last partial batch dropped (see
    training_batches). set_epoch(seed) starts another epoch on the same loader."""

    def __init__(self, n: int, batch_size: int, train: bool, seed: int = 0):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed

    def set_epoch(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return training_batches(self.n, self.batch_size) if self.train else -(-self.n // self.batch_size)

    def __iter__(self):
        order = range(self.n)
        if self.train:
            g = torch.Generator().manual_seed(self.seed)
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the draw DataLoader made first: same orders
            order = torch.randperm(self.n, generator=g).tolist()
        for b in range(len(self)):
            yield [(self.seed, i) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]


def to_model_input(batch_hwc: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x 3 -> N x 3 x H x W view; its strides are already channels_last."""
    return batch_hwc.to(device, non_blocking=True).permute(0, 3, 1, 2)


def auto_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    cores = usable_cores()
    return 0 if cores <= 2 else min(8, cores - 1)


def training_batches(n: int, batch_size: int) -> int:
    """Batches per training epoch: the last partial batch is dropped (BatchNorm on a few images is noise)
    unless it is the only one."""
    return n // batch_size if n > batch_size else 1


@dataclass(frozen=True)
class LoaderSettings:
    """How a loader runs: its worker processes (0: in this process), pinned host memory (for copies to a GPU), and
    whether the workers stay up between epochs (loader.batch_sampler.set_epoch(seed) before each)."""

    workers: int = 0
    pin_memory: bool = False
    persistent: bool = False


def make_loader(
    ds: FaceDataset, batch_size: int, *, train: bool, seed: int = 0, settings: LoaderSettings = LoaderSettings()
) -> DataLoader:
    """train=True: shuffled, last partial batch dropped (see training_batches). Deterministic for a given
    seed: the order and every sample's augmentation derive from it, not from the worker count."""
    return DataLoader(
        ds,
        batch_sampler=EpochBatches(len(ds), batch_size, train, seed),
        num_workers=settings.workers,
        generator=torch.Generator().manual_seed(seed),  # the workers' base seed, never the global RNG
        persistent_workers=settings.persistent and settings.workers > 0,
        pin_memory=settings.pin_memory,
    )
