"""The embedded default: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

It ships inside scikit-learn, so ``tlbench`` with no arguments runs anywhere, offline.
"""

from __future__ import annotations

import numpy as np

from ..config import DatasetConfig
from .base import DatasetMeta, Source

CLASSES = [str(d) for d in range(10)]  # load_digits().target_names, as strings
SIZE = 8


def load(cfg: DatasetConfig) -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # pixel values are 0..16; scale to 0..255 uint8 so every source shares one image type
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return Source(
        tasks={"label": [str(c) for c in digits.target_names]},
        labels={"label": digits.target.astype(np.int64)},
        images=images,
        default_task="label",
    )


def meta(cfg: DatasetConfig) -> DatasetMeta:
    """The classes and size without loading the images (they are fixed)."""
    return DatasetMeta(tasks={"label": list(CLASSES)}, default_task="label",
                       origin="scikit-learn's digits (10 classes, 8x8)", native_size=lambda: SIZE)
