"""What ``tlbench plan`` needs from a dataset, without reading its images.

:func:`plan_tasks` gives the selected tasks with their class names, exactly as
``build_data`` would (same ``dataset.task`` selection and errors), from each family's cheap
``meta`` function: fixed class lists (``sklearn_digits``; ``cifar10`` and ``emnist`` also
without their files: their official lists), small metadata files when present (CIFAR-10's
``batches.meta``, EMNIST's mapping file) or the folder names of file datasets (listing folders,
never opening an image).
"""

from __future__ import annotations

from ..config import DatasetConfig
from . import family_function, select_tasks
from .base import DatasetMeta, Source

def dataset_meta(cfg: DatasetConfig) -> DatasetMeta:
    return family_function(cfg.name, "meta")(cfg)


def plan_tasks(cfg: DatasetConfig) -> tuple[dict[str, list[str]], DatasetMeta]:
    """``({selected task: class names}, the dataset's meta)`` without reading any image."""
    meta = dataset_meta(cfg)
    stub = Source(tasks=meta.tasks, labels={}, images=[], default_task=meta.default_task)
    return {t: list(meta.tasks[t]) for t in select_tasks(stub, cfg.task)}, meta
