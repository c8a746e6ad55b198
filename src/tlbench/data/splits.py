"""Seeded, stratified train/val/test splits.

Splits depend on ``dataset.split_seed`` only, so changing the training seed keeps the
same split. The indices are saved to ``splits.json`` in every run directory.

A label-efficiency run (``dataset.train_fraction`` / ``dataset.train_per_class``) then keeps a
stratified part of the *training* split only (:func:`train_subset`); validation and test are the
same items as without it. That part is drawn from ``(split_seed, seed)``: each training seed
trains on another subset, so a curve's spread over seeds covers the choice of the labelled
items, not just the initialization, while runs that differ only in the model (scratch vs
pretrained) with the same seed see the same items. For one seed the subsets are nested: the
items kept at 10 % are among those kept at 25 %.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from ..errors import TlbenchError


def per_class_subset(labels: np.ndarray, pool: np.ndarray, count: Callable[[int], int], seed) -> np.ndarray:
    """Keep ``count(n)`` items of each class of ``pool`` (``n``: the class's items in it), a seeded
    choice, sorted. Each class is permuted once per seed whatever ``count`` is, so a smaller count
    keeps a subset of a larger one's items (nested subsets)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        keep.append(rng.permutation(members)[:count(len(members))])
    return np.sort(np.concatenate(keep))


def limit_per_class(labels: np.ndarray, pool: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Keep at most ``limit`` items of each class from ``pool`` (a seeded choice, sorted)."""
    return per_class_subset(labels, pool, lambda n: limit, seed)


SUBSET_STREAM = 0x7375_6273  # tells the training subset's random stream from other uses of the same seeds


def subset_seed(split_seed: int, seed: int) -> tuple[int, int, int]:
    """The seed of the training subset: the split's and the run's (see the module docstring)."""
    return (split_seed, seed, SUBSET_STREAM)


def kept_per_class(n: int, fraction: float = 1.0, per_class: Optional[int] = None) -> int:
    """How many of a class's ``n`` training items a label-efficiency run keeps: ``per_class``
    (at most ``n``), else ``fraction * n`` rounded half up."""
    return min(n, per_class) if per_class is not None else int(math.floor(n * fraction + 0.5))


def train_subset(labels: np.ndarray, train, *, seed, fraction: float = 1.0,
                 per_class: Optional[int] = None) -> np.ndarray:
    """The training items kept for ``dataset.train_fraction`` / ``dataset.train_per_class``:
    per class ``kept_per_class`` of them (stratified: each class within one item of ``fraction``
    of its items), a seeded choice (:func:`per_class_subset`, so nested across fractions), sorted.
    Every class keeps at least one item, else :class:`TlbenchError`."""
    train = np.asarray(train, dtype=np.int64)
    smallest = int(np.unique(labels[train], return_counts=True)[1].min())
    if kept_per_class(smallest, fraction, per_class) < 1:
        need = math.ceil(0.5 / smallest * 1000) / 1000
        raise TlbenchError(
            f"dataset.train_fraction={fraction:g} keeps no training item of the smallest class (it has {smallest} "
            f"in the training split; {fraction:g} x {smallest} rounds to 0); every class must keep at least one: "
            f"use dataset.train_fraction >= {need:g} or dataset.train_per_class=1")
    return per_class_subset(labels, train, lambda n: kept_per_class(n, fraction, per_class), seed)


def _split(pool: np.ndarray, labels: np.ndarray, fraction: float, seed: int, stratify: bool, what: str):
    """Split ``pool`` into (rest, part) where part holds ``fraction`` of it."""
    n_part = int(round(len(pool) * fraction))
    if n_part == 0 or n_part == len(pool):
        raise TlbenchError(
            f"the {what} split would be empty or take everything: {fraction:g} of {len(pool)} items "
            f"is {n_part}; change dataset.{what}_fraction or use more data (dataset.limit_per_class)"
        )
    from sklearn.model_selection import train_test_split  # here: `tlbench plan` imports this package, never splits

    strat = labels[pool] if stratify else None
    try:
        rest, part = train_test_split(pool, test_size=n_part, random_state=seed, stratify=strat)
    except ValueError as e:
        raise TlbenchError(
            f"cannot make a stratified {what} split of {len(pool)} items ({e}); "
            "use more images per class, a larger fraction, or dataset.stratify=false"
        ) from None
    return np.sort(rest), np.sort(part)


def make_splits(
    n: int,
    labels: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    official_test: np.ndarray | None,
    seed: int,
    stratify: bool = True,
    pool: np.ndarray | None = None,
) -> dict[str, list[int]]:
    """Return ``{"train": [...], "val": [...], "test": [...]}`` source indices.

    With ``official_test`` the format's own test split is the test set and val is carved
    from the rest (``val_fraction`` of it); otherwise the fractions apply to the whole pool.
    """
    pool = np.arange(n) if pool is None else np.asarray(pool)
    if official_test is not None:
        is_test = np.zeros(n, dtype=bool)
        is_test[np.asarray(official_test)] = True
        test = pool[is_test[pool]]
        trainval = pool[~is_test[pool]]
        if len(test) == 0:
            raise TlbenchError("the dataset's official test split is empty")
    else:
        trainval, test = _split(pool, labels, test_fraction, seed, stratify, "test")
    # val is a fraction of the whole when carving from the pool, of train+val otherwise
    frac = val_fraction if official_test is not None else val_fraction / (1.0 - test_fraction)
    train, val = _split(trainval, labels, frac, seed + 1, stratify, "val")
    return {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}
