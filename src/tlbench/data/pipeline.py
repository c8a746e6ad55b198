"""The tensor data path (``dataset.pipeline``; issue #13).

``tensor``: every image of the splits is decoded once into one uint8 tensor at a *storage size*
and kept on the training device (``loaders.make_loaders`` moves it there once). A batch is one
index-slice of that tensor with the training sampler's order and flips (``loaders.Batches`` +
``EpochSampler``, so DDP ranks take their part as on the loader path), then flip, resize to the
model size, random crop/pad (``augment=flip_crop``), grayscale -> 3 channels and normalization
run on the whole batch on the device (:class:`BatchTransform`). No per-item ``__getitem__``, no
collate.

Storage size: array datasets (CIFAR-10, EMNIST, sklearn digits) keep their native size and are
resized per batch; file datasets (``data/folders.py``) are decoded straight to the model's input
size, with the loader path's own ``Resize`` (PIL bilinear), so their images are the loader path's
exactly. Decoded file datasets are kept in the feature store (``trainer.feature_store``), keyed
by the files (relative path, size, mtime), the storage size and the channels: a second run skips
decoding; a damaged entry is rebuilt (``store.FeatureStore``).

Same images either way: the per-batch resize is ``torchvision.transforms.v2.functional.resize``
on uint8, bilinear, ``antialias=True``, which is PIL's bilinear resize within one grey level
(0 when upsampling on CPU); flips commute with it exactly. Same labels and the same flips for a
given (seed, epoch) (``loaders.flip_mask``). Random crops draw their offsets from the global
torch RNG (as ``T.RandomCrop`` does, so a resumed run repeats them) but in another order than
the loader path: the same distribution, not the same crops.

``loader``: the DataLoader path (per-item PIL transforms; deterministic splits that fit are
precomputed as float tensors). ``auto`` = tensor when the decoded images take at most
``dataset.tensor_budget_gb`` (default 4) and the augmentation is one the tensor path does.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from .. import progress
from ..devices import constant, to_device
from ..errors import TlbenchError
from ..models.base import InputSpec
from ..store import FeatureStore, as_tensor, make_key
from .base import Source, unpack
from .transforms import _ChannelFix, crop_padding, model_size

log = logging.getLogger(__name__)

TENSOR_AUGMENTS = ("none", "flip", "flip_crop")  # randaugment stays per image (PIL)
DECODE_VERSION = 1  # bump when decoding changes: old store entries are then not reused


@dataclass(frozen=True)
class Storage:
    size: int  # the square side images are kept at
    channels: int  # 1 (grayscale, expanded per batch when the model wants 3) or 3
    files: bool  # decoded from files (at the model size) rather than sliced from an array


@dataclass(frozen=True)
class Choice:
    mode: str  # tensor | loader
    reason: str
    storage: Storage
    bytes: int  # the decoded uint8 images of all splits

    def record(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "storage_size": self.storage.size,
                "storage_channels": self.storage.channels, "storage_bytes": self.bytes}


def storage(source: Source, spec: InputSpec, native: int) -> Storage:
    if isinstance(source.images, np.ndarray):
        gray = source.images.ndim == 3
        return Storage(int(source.images.shape[1]), 1 if gray or spec.channels == 1 else 3, False)
    return Storage(model_size(spec, native), spec.channels, True)


def choose(cfg, source: Source, n_items: int, spec: InputSpec, native: int) -> Choice:
    """``dataset.pipeline`` -> the path this run takes, and why. ``n_items``: images in all splits."""
    st = storage(source, spec, native)
    nbytes = n_items * st.channels * st.size ** 2
    size = f"{nbytes / 2**30:.2f} GB"
    if cfg.pipeline == "loader":
        return Choice("loader", "dataset.pipeline=loader", st, nbytes)
    if cfg.augment not in TENSOR_AUGMENTS:
        why = (f"dataset.augment={cfg.augment} transforms each image with PIL (the tensor path does "
               f"{', '.join(TENSOR_AUGMENTS)})")
        if cfg.pipeline == "tensor":
            raise TlbenchError(f"dataset.pipeline=tensor cannot apply: {why}; use dataset.pipeline=auto or loader")
        return Choice("loader", why, st, nbytes)
    if cfg.pipeline == "tensor":
        return Choice("tensor", f"dataset.pipeline=tensor ({size} of uint8 images)", st, nbytes)
    if nbytes > cfg.tensor_budget_gb * 2**30:
        return Choice("loader", f"the decoded images would take {size} > dataset.tensor_budget_gb="
                                f"{cfg.tensor_budget_gb:g}", st, nbytes)
    return Choice("tensor", f"the decoded images take {size} <= dataset.tensor_budget_gb="
                            f"{cfg.tensor_budget_gb:g}", st, nbytes)


# ----------------------------------------------------------------------------- decoding
def decode(source: Source, idx: np.ndarray, st: Storage, store: FeatureStore) -> tuple[torch.Tensor, dict]:
    """uint8 ``(len(idx), C, S, S)`` images of the source items ``idx``, and a record."""
    t0 = time.perf_counter()
    if not st.files:
        return torch.from_numpy(_from_array(source.images[idx], st)), {"decoded_s": time.perf_counter() - t0}
    parts = {"kind": "decoded images", "version": DECODE_VERSION, "files": _files_digest(source, idx),
             "size": st.size, "channels": st.channels}
    arr, hit = store.get_or_create(make_key(parts), lambda: _decode_files(source, idx, st), parts, mmap="auto")
    rec = {"decoded_s": time.perf_counter() - t0, "reused": hit,
           "store": str(store.root) if store.root else None, "store_key": make_key(parts)}
    log.info("data: %d images decoded to %d px %s in %.1fs", len(idx), st.size,
             "(reused from the store)" if hit else "once", rec["decoded_s"])
    return as_tensor(arr), rec


def _from_array(a: np.ndarray, st: Storage) -> np.ndarray:
    if a.ndim == 3:
        return np.ascontiguousarray(a[:, None])
    if st.channels == 1:  # RGB -> L as the loader path does it (PIL's integer formula)
        return np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in a])[:, None]
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def _decode_files(source: Source, idx, st: Storage) -> np.ndarray:
    """The loader path's own first steps (channel fix, ``Resize((S, S))``), on threads."""
    fix, resize = _ChannelFix(st.channels), T.Resize((st.size, st.size))

    def one(i):
        return np.asarray(resize(fix(source.image(int(i)))))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        a = np.stack(list(progress.bar(pool.map(one, idx), total=len(idx), desc=f"decoding {len(idx)} images",
                                       unit="img")))
    return _from_array(a, st)


def _files_digest(source: Source, idx) -> str:
    """What the decoded images depend on: each file's relative path, size and mtime."""
    import hashlib

    h = hashlib.sha256()
    for i in idx:
        st = os.stat(source.images[int(i)])
        h.update(f"{source.relpaths[int(i)] if source.relpaths else source.images[int(i)]}\0{st.st_size}\0"
                 f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------- per batch
class BatchTransform:
    """uint8 ``(B, C, S, S)`` on any device -> the model's float input, as the loader path's
    transform would give it: flip, resize (bilinear, antialias), random crop with zero padding,
    grayscale -> 3 channels, ``/255`` and normalization."""

    def __init__(self, spec: InputSpec, size: int, crop: bool, channels: int):
        self.size, self.pad = size, (crop_padding(size) if crop else 0)
        self.expand = channels == 1 and spec.channels == 3
        self.mean, self.std = tuple(spec.mean[: spec.channels]), tuple(spec.std[: spec.channels])

    def __call__(self, x: torch.Tensor, flips: "torch.Tensor | None" = None) -> torch.Tensor:
        if flips is not None:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = TF.resize(x, [self.size, self.size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if self.pad:
            x = random_crop(x, self.pad)
        x = x.float().div_(255)
        if self.expand:
            x = x.expand(-1, 3, -1, -1)
        return (x - constant(self.mean, x.device, (1, -1, 1, 1))) / constant(self.std, x.device, (1, -1, 1, 1))

    def __repr__(self) -> str:
        return (f"BatchTransform(size={self.size}, pad={self.pad}, expand={self.expand}, mean={self.mean}, "
                f"std={self.std})")


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image of ``x`` zero-padded by ``pad`` and cropped back to its size at an offset drawn
    from the global torch RNG (CPU, as ``T.RandomCrop``), as one gather."""
    b, c, h, w = x.shape
    off = to_device(torch.randint(0, 2 * pad + 1, (2, b)), x.device)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


# ----------------------------------------------------------------------------- the splits
class ImageSplit:
    """The tensor path's split (``data/pipeline.py``): uint8 images at their storage size. A
    request (a batch from ``loaders.Batches``, or one item) is one slice, transformed as a batch on
    the tensor's device; with ``flip``, the sampler's flip decisions apply; ``mirror`` mirrors all."""

    in_memory = True  # no loader workers needed; make_loaders moves it to the GPU once

    def __init__(self, x: torch.Tensor, labels: dict[str, torch.Tensor], indices, transform,
                 flip: bool = False, mirror: bool = False):
        self.x, self.labels, self.indices, self.tasks = x, labels, list(indices), list(labels)
        self.transform, self.flip, self.mirror = transform, flip, mirror

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item):
        batch = isinstance(item, list)
        reqs = [unpack(r) for r in (item if batch else [item])]
        dev = self.x.device
        idx = to_device([i for i, _ in reqs], dev)
        flips = None
        if self.mirror or (self.flip and any(f for _, f in reqs)):
            flips = to_device([bool(self.mirror or f) for _, f in reqs], dev)
        x = self.transform(self.x[idx], flips)
        y = {t: v[idx if v.device == dev else idx.to(v.device)] for t, v in self.labels.items()}
        return (x, y) if batch else (x[0], {t: v[0] for t, v in y.items()})

    def to(self, device) -> "ImageSplit":
        return self.variant(x=self.x.to(device), labels={t: y.to(device) for t, y in self.labels.items()})

    def variant(self, **changes) -> "ImageSplit":
        """A copy sharing the tensors, with some of ``x, labels, transform, flip, mirror`` replaced."""
        kw = {"x": self.x, "labels": self.labels, "transform": self.transform, "flip": self.flip,
              "mirror": self.mirror, **changes}
        return ImageSplit(kw.pop("x"), kw.pop("labels"), self.indices, **kw)


def tensor_splits(source: Source, splits: dict, tasks: list[str], spec: InputSpec, native: int, cfg,
                  choice: Choice, store: FeatureStore, decoded: Optional[dict] = None) -> tuple[dict, dict]:
    """``{split: ImageSplit}`` over one decode of every image the splits use (or of the splits
    ``decoded``, a superset: the splits before a training subset), and a record."""
    st = choice.storage
    needed = np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in (decoded or splits).values()]))
    images, rec = decode(source, needed, st, store)
    size = model_size(spec, native)
    flip = cfg.augment in ("flip", "flip_crop")
    out = {}
    for name, idx in splits.items():
        rows = torch.as_tensor(np.searchsorted(needed, np.asarray(idx, dtype=np.int64)))
        labels = {t: torch.as_tensor(source.labels[t][list(idx)], dtype=torch.long) for t in tasks}
        train = name == "train"
        tf = BatchTransform(spec, size, crop=train and cfg.augment == "flip_crop", channels=st.channels)
        out[name] = ImageSplit(images[rows], labels, idx, tf, flip=train and flip)
    return out, {**choice.record(), **rec}
