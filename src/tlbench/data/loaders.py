"""DataLoaders: seeded per-epoch shuffling (so a resumed run sees the same order) and
device-aware defaults (workers and pinned memory on CUDA; precomputed tensors moved to
the GPU once, where they then stay)."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from . import TensorSplit
from .. import dist
from ..config import Config
from .base import DataBundle
from .pipeline import ImageSplit

log = logging.getLogger(__name__)


def flip_mask(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Which of the ``n`` items of a split are mirrored in ``epoch``: a pure function of
    (seed, epoch, item), shared by the image path and the cached-feature path, so the two see
    the same flips and stay comparable sample by sample."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_777_777_777)
    return torch.rand(n, generator=g) < 0.5


class EpochSampler(Sampler):
    """A permutation that depends only on (seed, epoch): resume-safe shuffling. It yields
    ``(item, flip)`` pairs: a dataset that augments with flips mirrors the items whose ``flip``
    is set (:func:`flip_mask`); every other dataset ignores it.

    With ``world`` > 1 (DDP) it yields rank ``rank``'s part of every global batch of
    ``global_batch`` items: the ranks' parts, concatenated, are that global batch (a tail shorter
    than ``world`` is dropped, so no rank is left without a batch)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, global_batch: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.world, self.global_batch = rank, world, global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        flips = flip_mask(self.seed, self.epoch, self.n).tolist()
        return iter([(order[j], flips[order[j]]) for j in self._positions()])

    def _positions(self) -> list[int]:
        """Positions in the epoch's order this rank takes."""
        if self.world == 1:
            return list(range(self.n))
        out = []
        for start in range(0, self.n, self.global_batch):
            m = min(self.global_batch, self.n - start)
            if m < self.world:
                break
            base, extra = divmod(m, self.world)
            lo = start + self.rank * base + min(self.rank, extra)
            out.extend(range(lo, lo + base + (self.rank < extra)))
        return out

    def __len__(self) -> int:
        return len(self._positions())


class Strided(Sampler):
    """Evaluation shard of rank ``rank``: items ``rank, rank + world, ...`` in order
    (``dist.interleave`` puts the gathered predictions back in index order)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class Batches(Sampler):
    """Whole batches of item requests for in-memory splits: the dataset gets one list per batch
    and slices its tensors (no per-item ``__getitem__``, no collate). ``items``: the
    :class:`EpochSampler` (training: its order and flips) or :class:`Strided` (evaluation)."""

    def __init__(self, items: Sampler, batch_size: int):
        self.items, self.batch_size = items, batch_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.items, "set_epoch"):
            self.items.set_epoch(epoch)

    def __iter__(self):
        items = list(self.items)
        return iter([items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)])

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loaders(bundle: DataBundle, cfg: Config, device: torch.device) -> dict[str, DataLoader]:
    """Loaders of this process: the whole splits for one process; in DDP this rank's part of
    every global training batch and its strided shard of val/test (``dist``)."""
    d, w = cfg.dataset, dist.world()
    batch = dist.check_batch(cfg.batch_size)
    cuda = device.type == "cuda"
    loaders = {}
    for name in ("train", "val", "test"):
        ds = getattr(bundle, name)
        on_device = cuda and (isinstance(ds, (TensorSplit, ImageSplit)) or (  # stored prefix outputs that fit
            hasattr(ds, "nbytes") and hasattr(ds, "to") and ds.nbytes <= d.tensor_budget_gb * 2**30))
        if on_device:
            ds = ds.to(device)  # data stays on the GPU: no per-batch host->device copies
            if (d.num_workers or 0) > 0 or d.pin_memory:
                log.info("%s split is on %s: batches are slices of it, without loader workers or pinning "
                         "(dataset.num_workers / pin_memory apply to splits on the host)", name, device)
            workers, pin = 0, False  # a worker process cannot use CUDA tensors, nor can they be pinned
        else:
            workers = d.num_workers if d.num_workers is not None else (
                0 if getattr(ds, "in_memory", False) or not cuda else min(8, os.cpu_count() or 1))
            pin = d.pin_memory if d.pin_memory is not None else cuda
        sampler = (EpochSampler(len(ds), cfg.seed, w.rank, w.size, cfg.batch_size) if name == "train"
                   else Strided(len(ds), w.rank, w.size))
        if getattr(ds, "in_memory", False) and workers == 0:
            # pinned on CUDA when the split stayed on the host, so batch_to's copy does not block
            loaders[name] = DataLoader(ds, batch_size=None, sampler=Batches(sampler, batch), pin_memory=pin)
            continue
        loaders[name] = DataLoader(
            ds, batch_size=batch, sampler=sampler, shuffle=False, num_workers=workers,
            pin_memory=pin, persistent_workers=workers > 0, worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    return loaders
