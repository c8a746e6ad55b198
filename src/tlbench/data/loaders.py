"""DataLoaders: seeded per-epoch shuffling (so a resumed run sees the same order) and
device-aware defaults (workers and pinned memory on CUDA; precomputed tensors moved to
the GPU once, where they then stay)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..config import Config
from .base import DataBundle


def flip_mask(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Which of the ``n`` items of a split are mirrored in ``epoch``: a pure function of
    (seed, epoch, item), shared by the image path and the cached-feature path, so the two see
    the same flips and stay comparable sample by sample."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_777_777_777)
    return torch.rand(n, generator=g) < 0.5


class EpochSampler(Sampler):
    """A permutation that depends only on (seed, epoch): resume-safe shuffling. It yields
    ``(item, flip)`` pairs: a dataset that augments with flips mirrors the items whose ``flip``
    is set (:func:`flip_mask`); every other dataset ignores it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        flips = flip_mask(self.seed, self.epoch, self.n).tolist()
        return iter([(i, flips[i]) for i in order])

    def __len__(self) -> int:
        return self.n


class Batches(Sampler):
    """Whole batches of item requests for in-memory splits: the dataset gets one list per batch
    and slices its tensors (no per-item ``__getitem__``, no collate). Training: the
    :class:`EpochSampler` order and flips cut into batches; evaluation: in order."""

    def __init__(self, n: int, batch_size: int, epochs: "EpochSampler | None" = None):
        self.n, self.batch_size, self.epochs = n, batch_size, epochs

    def set_epoch(self, epoch: int) -> None:
        if self.epochs is not None:
            self.epochs.set_epoch(epoch)

    def __iter__(self):
        items = list(self.epochs) if self.epochs is not None else list(range(self.n))
        return iter([items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)])

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loaders(bundle: DataBundle, cfg: Config, device: torch.device) -> dict[str, DataLoader]:
    from . import TensorSplit

    d = cfg.dataset
    cuda = device.type == "cuda"
    loaders = {}
    for name in ("train", "val", "test"):
        ds = getattr(bundle, name)
        on_device = isinstance(ds, TensorSplit) and cuda
        if on_device:
            ds = ds.to(device)  # data stays on the GPU: no per-batch host->device copies
        workers = d.num_workers if d.num_workers is not None else (
            0 if getattr(ds, "in_memory", False) or not cuda else min(8, os.cpu_count() or 1))
        pin = d.pin_memory if d.pin_memory is not None else (cuda and not on_device)
        sampler = EpochSampler(len(ds), cfg.seed) if name == "train" else None
        if getattr(ds, "in_memory", False) and workers == 0:
            loaders[name] = DataLoader(ds, batch_size=None, sampler=Batches(len(ds), cfg.batch_size, sampler))
            continue
        loaders[name] = DataLoader(
            ds, batch_size=cfg.batch_size, sampler=sampler, shuffle=False, num_workers=workers,
            pin_memory=pin, persistent_workers=workers > 0, worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    return loaders
