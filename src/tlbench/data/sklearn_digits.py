"""The embedded default: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

It ships inside scikit-learn, so ``tlbench`` with no arguments runs anywhere, offline.
"""

from __future__ import annotations

import numpy as np

from ..config import DatasetConfig
from .base import Source


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
