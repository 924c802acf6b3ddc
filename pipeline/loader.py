"""Batches from the uint8 image cache: albumentations on uint8 HWC, pixels normalised inside the model."""

from __future__ import annotations

import os

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import TrainConfig


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
    def __init__(self, images: np.ndarray, rows: np.ndarray, age=None, gender=None, transform=None):
        self.images, self.rows, self.transform = images, rows, transform
        self.age = np.zeros(len(rows), np.float32) if age is None else np.asarray(age, np.float32)
        self.gender = np.zeros(len(rows), np.float32) if gender is None else np.asarray(gender, np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        img = self.images[self.rows[i]]
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        if not img.flags.writeable or not img.flags.c_contiguous:  # memmap rows are read-only
            img = np.ascontiguousarray(img).copy()
        return torch.from_numpy(img), self.age[i], self.gender[i]


def to_model_input(batch_hwc: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x 3 -> N x 3 x H x W view; its strides are already channels_last."""
    return batch_hwc.to(device, non_blocking=True).permute(0, 3, 1, 2)


def auto_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores - 1)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    transform = info.dataset.transform
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


def make_loader(ds: FaceDataset, batch_size: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    """Deterministic for a given seed: shuffling and augmentation both derive from it."""
    g = torch.Generator()
    g.manual_seed(seed)
    if ds.transform is not None and workers == 0:
        ds.transform.set_random_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=g,
        worker_init_fn=_seed_worker if workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=shuffle and len(ds) > batch_size,
    )
