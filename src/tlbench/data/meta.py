"""What ``tlbench plan`` needs from a dataset, without reading its images.

:func:`plan_tasks` gives the selected tasks with their class names, exactly as
``build_data`` would (same ``dataset.task`` selection and errors), from each family's cheap
``meta`` function: fixed class lists (``sklearn_digits``; ``cifar10`` and ``emnist`` also
without their files: their official lists), small metadata files when present (CIFAR-10's
``batches.meta``, EMNIST's mapping file) or the folder names of file datasets (listing folders,
never opening an image).
"""

from __future__ import annotations

import importlib
from typing import Callable

from ..config import DatasetConfig
from ..errors import TlbenchError, choices
from . import LOADERS, select_tasks
from .base import DatasetMeta, Source

# dataset name -> "module:function" (like data.LOADERS)
META = {
    "sklearn_digits": "sklearn_digits:meta",
    "cifar10": "cifar10:meta",
    "emnist": "emnist:meta",
    "handwritten_digits": "folders:meta_handwritten_digits",
    "chest_xray": "folders:meta_chest_xray",
    "image_folder": "folders:meta_image_folder",
}


def dataset_meta(cfg: DatasetConfig) -> DatasetMeta:
    if cfg.name not in META:
        raise TlbenchError(f"dataset={cfg.name!r} is unknown; choose one of {choices(LOADERS)}")
    module, fn = META[cfg.name].split(":")
    meta: Callable[[DatasetConfig], DatasetMeta] = getattr(importlib.import_module(f".{module}", __package__), fn)
    return meta(cfg)


def plan_tasks(cfg: DatasetConfig) -> tuple[dict[str, list[str]], DatasetMeta]:
    """``({selected task: class names}, the dataset's meta)`` without reading any image."""
    meta = dataset_meta(cfg)
    stub = Source(tasks=meta.tasks, labels={}, images=[], default_task=meta.default_task)
    return {t: list(meta.tasks[t]) for t in select_tasks(stub, cfg.task)}, meta
