"""Seeded, stratified train/val/test splits.

Splits depend on ``dataset.split_seed`` only, so changing the training seed keeps the
same split. The indices are saved to ``splits.json`` in every run directory.
"""

from __future__ import annotations

import numpy as np

from ..errors import TlbenchError


def limit_per_class(labels: np.ndarray, pool: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Keep at most ``limit`` items of each class from ``pool`` (a seeded choice, sorted)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        keep.append(rng.permutation(members)[:limit])
    return np.sort(np.concatenate(keep))


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
