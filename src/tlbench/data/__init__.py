"""``build_data``: a dataset name + the model's input spec -> a :class:`DataBundle`.

Each dataset family has its own loader module returning a :class:`Source` read from the
official on-disk format; this module selects the task(s), splits, applies transforms and
(when the result fits in memory and the transform is deterministic) precomputes tensors
once so epochs do not decode images again.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from typing import Callable

import numpy as np
import torch
from PIL import ImageOps
from torch.utils.data import Dataset

from ..config import DatasetConfig
from ..devices import to_device
from ..errors import TlbenchError, choices
from ..models.base import InputSpec
from ..registry import DATASETS
from .base import DataBundle, Source, unpack
from .pipeline import ImageSplit, choose, tensor_splits  # noqa: F401  (ImageSplit: tlbench.data.ImageSplit)
from ..progress import bar
from ..store import FeatureStore
from .splits import limit_per_class, make_splits, subset_seed, train_subset
from .transforms import build_transforms

log = logging.getLogger(__name__)

CHARACTERS = ("sklearn_digits", "emnist", "handwritten_digits")  # datasets of characters: never mirrored

MATERIALIZE_BYTES = 1 << 30  # precompute a split's tensors when they take less than this


def family_function(name: str, role: str) -> Callable:
    """A dataset's ``load`` or ``meta`` function (``role``) from ``registry.DATASETS``, its module
    imported only now (one family's dependencies never block another)."""
    if name not in DATASETS:
        raise TlbenchError(f"dataset={name!r} is unknown; choose one of {choices(DATASETS)}")
    entry = DATASETS[name]
    return getattr(importlib.import_module(f".{entry.module}", __name__), getattr(entry, role))


def load_source(cfg: DatasetConfig) -> Source:
    return family_function(cfg.name, "load")(cfg)


def select_tasks(source: Source, task: str | None) -> list[str]:
    """``dataset.task`` -> the list of tasks to train (``multitask`` = all of them)."""
    valid = list(source.tasks) + (["multitask"] if len(source.tasks) > 1 else [])
    task = task or source.default_task or next(iter(source.tasks))
    if task == "multitask" and len(source.tasks) > 1:
        return list(source.tasks)
    if task not in source.tasks:
        raise TlbenchError(f"dataset.task={task!r} is not a task of this dataset; choose one of {choices(valid)}")
    return [task]


class SplitDataset(Dataset):
    """Items ``indices`` of a source -> ``(image_tensor, {task: label})``. With ``flip``, an item
    requested as ``(i, True)`` is mirrored before the transform (the training sampler decides,
    see ``loaders.flip_mask``); ``mirror=True`` mirrors every item (the cached flip variant)."""

    def __init__(self, source: Source, indices, tasks: list[str], transform, flip: bool = False,
                 mirror: bool = False):
        self.source, self.indices, self.tasks, self.transform = source, list(indices), tasks, transform
        self.flip, self.mirror = flip, mirror
        self.labels = {t: torch.as_tensor(source.labels[t][self.indices], dtype=torch.long) for t in tasks}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        i, flip = unpack(item)
        img = self.source.image(self.indices[i])
        if self.mirror or (flip and self.flip):
            img = ImageOps.mirror(img)
        return self.transform(img), {t: self.labels[t][i] for t in self.tasks}


class TensorSplit(Dataset):
    """A split whose transformed images are precomputed as one tensor."""

    in_memory = True  # no loader workers needed
    def __init__(self, x: torch.Tensor, labels: dict[str, torch.Tensor], indices):
        self.x, self.labels, self.indices = x, labels, list(indices)
        self.tasks = list(labels)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item):
        if isinstance(item, list):  # a whole batch (loaders.Batches): one slice per tensor
            idx = to_device([unpack(r)[0] for r in item], self.x.device)
            return self.x[idx], {t: y[idx if y.device == idx.device else idx.to(y.device)] for t, y in self.labels.items()}
        i, _ = unpack(item)
        return self.x[i], {t: y[i] for t, y in self.labels.items()}

    def to(self, device) -> "TensorSplit":
        return TensorSplit(self.x.to(device), {t: y.to(device) for t, y in self.labels.items()}, self.indices)


def materialize(ds: SplitDataset) -> Dataset:
    """Precompute all items of a deterministic split if they fit in memory."""
    if len(ds) == 0:
        return ds
    x0 = ds[0][0]
    if x0.numel() * 4 * len(ds) > MATERIALIZE_BYTES:
        return ds

    x = torch.stack([x0] + [ds[i][0] for i in bar(range(1, len(ds)), desc=f"decoding {len(ds)} images", unit="img")])
    return TensorSplit(x, ds.labels, ds.indices)


def _stratify_labels(source: Source, tasks: list[str]) -> np.ndarray:
    """One label per item combining all selected tasks (so multitask splits stay balanced)."""
    combined = np.zeros(len(source), dtype=np.int64)
    for t in tasks:
        combined = combined * len(source.tasks[t]) + np.asarray(source.labels[t], dtype=np.int64)
    return combined


def _class_counts(source: Source, splits, tasks) -> dict:
    out = {}
    for name, idx in splits.items():
        out[name] = {}
        for t in tasks:
            counts = Counter(np.asarray(source.labels[t])[idx].tolist())
            out[name][t] = {source.tasks[t][c]: int(counts.get(c, 0)) for c in range(len(source.tasks[t]))}
    return out


def _counts_line(per_class: dict, task: str) -> str:
    """``label: 10 classes, 122-128 per class`` (every count is in results.json's class_counts)."""
    n = list(per_class.values())
    spread = f"{min(n)}" if min(n) == max(n) else f"{min(n)}-{max(n)}"
    return f"{task}: {len(n)} classes, {spread} per class"


def _native_size(source: Source) -> int:
    if isinstance(source.images, np.ndarray):
        return int(source.images.shape[1])
    return int(max(source.image(0).size))


def _shrink_train(cfg: DatasetConfig, source: Source, strat: np.ndarray, splits: dict, seed: int):
    """``dataset.train_fraction`` / ``train_per_class``: (splits with the kept training items, the
    record for splits.json and results.json, or None when the whole training split is used)."""
    if cfg.train_per_class is None and cfg.train_fraction >= 1.0:
        return splits, None
    kept = train_subset(strat, splits["train"], seed=subset_seed(cfg.split_seed, seed),
                        fraction=cfg.train_fraction, per_class=cfg.train_per_class)
    record = {"train_fraction": cfg.train_fraction, "train_per_class": cfg.train_per_class,
              "seed": [cfg.split_seed, seed], "n": len(kept), "n_full": len(splits["train"]),
              "full_fingerprint": source.fingerprint(splits)}
    log.info("training subset: %d of %d training items (%s; seeded by split_seed=%d and seed=%d)", len(kept),
             len(splits["train"]), f"train_fraction={cfg.train_fraction:g}" if cfg.train_per_class is None
             else f"train_per_class={cfg.train_per_class}", cfg.split_seed, seed)
    return {**splits, "train": kept.tolist()}, record


def _loader_splits(source: Source, splits: dict, tasks: list[str], cfg: DatasetConfig, train_tf, eval_tf) -> dict:
    """The DataLoader path: per-item transforms; deterministic splits that fit are precomputed."""
    datasets = {}
    for name, idx in splits.items():
        tf = train_tf if name == "train" else eval_tf
        ds = SplitDataset(source, idx, tasks, tf, flip=name == "train" and cfg.augment in ("flip", "flip_crop"))
        datasets[name] = materialize(ds) if (name != "train" or cfg.augment == "none") else ds
    return datasets


def _make_splits(source: Source, splits: dict, tasks: list[str], cfg: DatasetConfig, spec: InputSpec, store,
                 full: dict):
    """``{split: dataset}`` on the path ``dataset.pipeline`` chooses (``data/pipeline.py``), the
    eval transform (for other items of the source) and the record of the choice. ``full``: the
    splits before ``train_fraction`` / ``train_per_class``: the tensor path decodes all of their
    images, so every fraction of a curve shares one decoded entry in the store."""
    native = _native_size(source)
    train_tf, eval_tf = build_transforms(spec, cfg.augment, native, isinstance(source.images, list))
    n_items = len(np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in full.values()])))
    choice = choose(cfg, source, n_items, spec, native)
    log.info("data pipeline: %s (%s)", choice.mode, choice.reason)
    if choice.mode == "loader":
        return _loader_splits(source, splits, tasks, cfg, train_tf, eval_tf), eval_tf, choice.record()

    datasets, record = tensor_splits(source, splits, tasks, spec, native, cfg, choice,
                                     store if store is not None else FeatureStore(None), decoded=full)
    return datasets, eval_tf, record


def build_data(cfg: DatasetConfig, spec: InputSpec, store=None, seed: int = 0,
               check: Callable[[dict, dict], None] | None = None) -> DataBundle:
    """Load, select tasks, split, transform. Pure: no training state involved. ``store``: where
    the tensor path keeps decoded file datasets (a ``store.FeatureStore``; None: not on disk).
    ``seed`` (the run's ``seed``) only chooses the training subset of ``dataset.train_fraction`` /
    ``train_per_class``. ``check(selected tasks, all tasks)`` (``{task: class names}``) runs
    once the tasks are known, before splitting and decoding (``validation.check_tasks``)."""
    source = load_source(cfg)
    tasks = select_tasks(source, cfg.task)
    if cfg.name in CHARACTERS and cfg.augment in ("flip", "flip_crop"):
        log.warning("dataset.augment=%s mirrors images of dataset=%s: a mirrored digit or letter is often another "
                    "character or none (the presets use dataset.augment=none here)", cfg.augment, cfg.name)
    if check is not None:
        check({t: list(source.tasks[t]) for t in tasks}, source.tasks)
    strat = _stratify_labels(source, tasks)
    official = source.official_test if cfg.official_test else None
    pool = None
    if cfg.limit_per_class:  # per class in the training pool, and in the official test split apart
        is_test = np.zeros(len(source), dtype=bool)
        if official is not None:
            is_test[np.asarray(official)] = True
        parts = [np.flatnonzero(~is_test), np.flatnonzero(is_test)]
        pool = np.sort(np.concatenate([limit_per_class(strat, p, cfg.limit_per_class, cfg.split_seed)
                                       for p in parts if len(p)]))
    splits = make_splits(
        len(source), strat, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
        official_test=official, seed=cfg.split_seed, stratify=cfg.stratify, pool=pool,
    )
    full = splits
    splits, subset = _shrink_train(cfg, source, strat, splits, seed)
    datasets, eval_tf, pipeline_record = _make_splits(source, splits, tasks, cfg, spec, store, full)
    counts = _class_counts(source, splits, tasks)
    for name in splits:
        log.info("%s split: %d items; %s", name, len(splits[name]), "; ".join(_counts_line(counts[name][t], t)
                                                                           for t in tasks))
    weights = None
    if cfg.class_weights == "balanced":
        weights = {}
        for t in tasks:
            c = np.array(list(counts["train"][t].values()), dtype=np.float64)
            weights[t] = (c.sum() / (len(c) * np.maximum(c, 1))).tolist()
    return DataBundle(
        train=datasets["train"], val=datasets["val"], test=datasets["test"],
        tasks={t: list(source.tasks[t]) for t in tasks}, splits=splits, source=source,
        fingerprint=source.fingerprint(splits), class_counts=counts, class_weights=weights,
        eval_transform=eval_tf, pipeline=pipeline_record, train_subset=subset,
    )
