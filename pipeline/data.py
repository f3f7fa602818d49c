"""Datasets over the normalize stage's output.

Images are read from the memory-mapped ``images.npy`` as uint8 (no decode), resized to the
training size when it differs, augmented in the loader workers, and handed over as uint8
CHW tensors: the model scales them itself, so the copy to the GPU moves a quarter of the bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.imaging import resize_square, to_chw
from pipeline.layout import IMAGES_FILE, INDEX_FILE, NORMALIZE_SUMMARY_FILE


@dataclass(frozen=True)
class Split:
    """The rows of one split: their positions in ``images.npy`` and integer labels."""

    rows: np.ndarray
    labels: np.ndarray
    paths: list[str]


def load_index(processed_dir: Path) -> pd.DataFrame:
    """The manifest rows in ``images.npy`` order."""
    path = processed_dir / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `wbc normalize` (or `dvc repro`) first")
    return pd.read_csv(path, dtype={"path": str, "label": str, "split": str, "group": str})


def images_identity(processed_dir: Path, sampled_rows: int = 64) -> str:
    """A cheap identity of the processed images. It changes when ``images.npy`` is rewritten (its
    size or modification time), reshaped, or any of ``sampled_rows`` evenly spaced images differs,
    and when the normalize stage's summary beside it does; it reads megabytes, not the gigabytes
    a full hash of the array would."""
    path = processed_dir / IMAGES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `wbc normalize` (or `dvc repro`) first")
    stat = path.stat()
    images = np.load(path, mmap_mode="r")
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{images.shape}:{images.dtype}".encode())
    for row in np.unique(np.linspace(0, len(images) - 1, min(sampled_rows, len(images))).round().astype(int)):
        digest.update(np.ascontiguousarray(images[row]).tobytes())
    summary = processed_dir / NORMALIZE_SUMMARY_FILE
    if summary.is_file():
        digest.update(summary.read_bytes())
    return digest.hexdigest()


def select_split(index: pd.DataFrame, split: str, classes: list[str]) -> Split:
    """Rows of ``split`` with labels encoded in ``classes`` order."""
    unknown = sorted(set(index["label"]) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} in the processed data are not in data.classes {classes}")
    mask = index["split"].to_numpy() == split
    lookup = {name: i for i, name in enumerate(classes)}
    labels = index.loc[mask, "label"].map(lookup).to_numpy(dtype=np.int64)
    return Split(np.flatnonzero(mask), labels, index.loc[mask, "path"].tolist())


class ProcessedImages(Dataset):
    """(uint8 CHW image tensor, label) pairs read from ``images.npy``.

    Items may be indexed by ``(epoch, i)`` (see :class:`EpochSampler`): the augmentation of
    each draw is then seeded by (seed, epoch, i), so it does not depend on the number of loader
    workers, their scheduling, or whether the run was resumed.
    """

    def __init__(self, processed_dir: Path, split: Split, image_size: int, policy: A.Compose | None = None,
                 seed: int = 0):
        self.images_path = processed_dir / IMAGES_FILE
        self.split = split
        self.image_size = image_size
        self.policy = policy
        self.seed = seed
        self._images: np.ndarray | None = None  # opened lazily: one memory map per worker process

    def __len__(self) -> int:
        return len(self.split.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, item = key if isinstance(key, tuple) else (0, key)
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        image = resize_square(np.asarray(self._images[self.split.rows[item]]), self.image_size)
        if self.policy is not None:
            self.policy.set_random_seed(int(np.random.SeedSequence([self.seed, epoch, item]).generate_state(1)[0]))
            image = self.policy(image=image)["image"]
        tensor = torch.from_numpy(to_chw(image))
        return tensor, int(self.split.labels[item])


class EpochSampler(Sampler):
    """Wraps a sampler so it yields ``(epoch, index)``: the epoch reaches the dataset even in
    persistent loader workers, which never see attributes set in the main process."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; forwarded to samplers that reshuffle per epoch (DistributedSampler)."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
