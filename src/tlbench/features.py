"""The frozen-prefix cache: what does not train is computed once.

When the trainable backbone parameters form a suffix of its blocks (``last_block``,
``first_n``, an index/pattern choice ending at the last block) — or no backbone parameter
trains at all (``linear_probe``) — the backbone splits into a frozen ``prefix`` and a trainable
``suffix`` (``models/split.py``). Each split's images go through the prefix once; training and
evaluation then run ``suffix + heads`` on the stored outputs. With ``dataset.augment=flip`` the
prefix output of each image *and* of its mirror are stored and every epoch picks one per item
with the sampler's flip decision (``loaders.flip_mask``), the same decision the image path uses.

The outputs live in the :class:`~tlbench.store.FeatureStore` (``trainer.feature_store``, default
``$TLBENCH_CACHE/features`` or ``~/.cache/tlbench/features``), keyed by the prefix's weights,
the split point, the input transform, the dataset fingerprint + split, the dtype and how they
were computed (device type, autocast), so the jobs of a sweep (lr x seed x head) compute them once.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import dist, progress
from .config import Config
from .data import SplitDataset, unpack
from .devices import to_device
from .engine import LoopOptions, autocast, batch_to
from .errors import TlbenchError
from .models.split import split_backbone, split_point
from .store import as_tensor, make_key, open_store, tensor_digest

log = logging.getLogger(__name__)

CACHEABLE_AUGMENT = ("none", "flip")
DTYPES = {"float16": np.float16, "float32": np.float32}
TORCH_DTYPES = {np.float16: torch.float16, np.float32: torch.float32}  # of DTYPES


@dataclass
class CacheDecision:
    applied: bool
    reason: str
    split_block: Optional[str] = None  # first block of the trainable suffix; None = whole backbone frozen


def backbone_frozen(model) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def decide(cfg: Config, model, plan) -> CacheDecision:
    """Whether the frozen part of the backbone can be computed once, and why (not)."""
    mode = str(cfg.trainer.cache_features).lower()
    if mode == "false":
        return CacheDecision(False, "trainer.cache_features=false")
    d = _decide(cfg, model, plan)
    if mode == "true" and not d.applied:
        raise TlbenchError(f"trainer.cache_features=true but the frozen-prefix cache cannot apply: {d.reason}; "
                           f"use trainer.cache_features=auto (the default) to train without it")
    return d


def _decide(cfg: Config, model, plan) -> CacheDecision:
    if getattr(model, "reconstructs", False):
        return CacheDecision(False, "a reconstruction run: the decoder reads the encoder's spatial output, "
                                    "and the loss needs the image")
    if cfg.freeze.gradual:
        return CacheDecision(False, "freeze.gradual moves the trainable part every few epochs")
    if cfg.dataset.augment not in CACHEABLE_AUGMENT:
        return CacheDecision(False, f"dataset.augment={cfg.dataset.augment} is random per epoch "
                                    f"(cacheable: {', '.join(CACHEABLE_AUGMENT)})")
    if backbone_frozen(model):
        if cfg.freeze.bn == "train":
            return CacheDecision(False, "freeze.bn=train: the frozen backbone's BatchNorm statistics change")
        return CacheDecision(True, "the whole backbone is frozen: its features are computed once")
    # frozen blocks after the first trainable one just run in the suffix (DenseNet's denselayer16 preset)
    block, why = split_point(model.backbone, list(plan.trainable), require_suffix=False,
                             frozen_bn_eval=cfg.freeze.bn == "eval")
    if block is None:
        return CacheDecision(False, why)
    return CacheDecision(True, why, block)


class SuffixNet(nn.Module):
    """``suffix + heads`` of a model, fed the stored prefix outputs. Shares the model's modules
    (its train/eval mode, its parameters): checkpoints keep saving the whole model."""

    def __init__(self, model: nn.Module, suffix: Optional[nn.Module]):
        super().__init__()
        self.model, self.suffix = model, suffix

    def forward(self, h: torch.Tensor):
        h = h.float()  # stored as trainer.feature_dtype; batches cross to the device in that dtype
        return self.model.heads_forward(self.suffix(h) if self.suffix is not None else h)


class FeatureSplit(Dataset):
    """Stored prefix outputs of one split (and of its mirrored images), with the labels."""

    in_memory = True  # no loader workers needed

    def __init__(self, h, h_flip, labels: dict, indices):
        self.h, self.h_flip = as_tensor(h), (as_tensor(h_flip) if h_flip is not None else None)
        self.labels, self.indices = labels, list(indices)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.h, self.h_flip) if t is not None)

    def to(self, device) -> "FeatureSplit":
        """The stored outputs and labels on ``device`` (a memory-mapped entry is read whole)."""
        return FeatureSplit(self.h.to(device), self.h_flip.to(device) if self.h_flip is not None else None,
                            {t: torch.as_tensor(y).to(device) for t, y in self.labels.items()}, self.indices)

    def __len__(self) -> int:
        return len(self.h)

    def __getitem__(self, item):
        if isinstance(item, list):  # a whole batch (loaders.Batches)
            reqs = [unpack(r) for r in item]
            idx = to_device([i for i, _ in reqs], self.h.device)
            h = self.h[idx]
            if self.h_flip is not None:
                flips = [bool(f) for _, f in reqs]
                if any(flips):  # decided on the host; torch.where, as a boolean index would sync the device
                    flip = to_device(flips, self.h.device).view(-1, *([1] * (h.dim() - 1)))
                    h = torch.where(flip, self.h_flip[idx], h)
            return h, {t: y[idx] for t, y in self.labels.items()}  # as stored: SuffixNet makes it float
        i, flip = unpack(item)
        src = self.h_flip if (flip and self.h_flip is not None) else self.h
        return src[i].float(), {t: y[i] for t, y in self.labels.items()}


def cache_features(cfg: Config, bundle, model, opts: LoopOptions, decision: CacheDecision):
    """Run the frozen prefix once over each split (through the store). Returns the bundle of
    stored outputs, the module to train on them, and a record for results.json."""
    t0 = time.perf_counter()
    model.eval()
    if decision.split_block is None:
        prefix, suffix = model.features, None
        weights = list(model.backbone.state_dict().values())
    else:
        prefix_mod, suffix = split_backbone(model.backbone, decision.split_block)
        prefix = prefix_mod
        weights = list(prefix_mod.state_dict().values())
    dtype = cfg.trainer.feature_dtype
    base = {"weights": tensor_digest(weights), "split": decision.split_block, "model": cfg.model.name,
            "arch": cfg.model.arch, "transform": repr(bundle.eval_transform), "input": repr(model.backbone.input_spec),
            "fingerprint": bundle.fingerprint, "dtype": dtype,
            **({"pipeline": "tensor"} if (bundle.pipeline or {}).get("mode") == "tensor" else {}),
            **compute_key(opts)}
    store, cached, reused = open_store(cfg.trainer.feature_store), copy.copy(bundle), []
    flips = cfg.dataset.augment == "flip"
    for name in ("train", "val", "test"):
        ds = getattr(bundle, name)
        n = _n_items(cfg, name, len(ds))
        arrays = []
        for mirror in ((False, True) if (flips and name == "train") else (False,)):
            parts = {**base, "split_name": name, "n": n, "mirror": mirror}
            images = _image_split(bundle, name, mirror)
            if dist.world().size > 1 and n >= dist.world().size:
                arr, hit = _sharded_pass(store, parts, prefix, images, n, cfg, opts, DTYPES[dtype])
            else:
                arr, hit = store.get_or_create(
                    make_key(parts), lambda: _prefix_pass(prefix, images, n, cfg, opts, DTYPES[dtype]), parts,
                    mmap="auto", fill=lambda path: _prefix_pass(prefix, images, n, cfg, opts, DTYPES[dtype], path))
            arrays.append(arr)
            reused.append(hit)
        labels = {t: ds.labels[t][:n] for t in bundle.tasks}
        setattr(cached, name, FeatureSplit(arrays[0], arrays[1] if len(arrays) > 1 else None, labels, ds.indices[:n]))
    seconds = time.perf_counter() - t0
    log.debug("feature store %s, key %s (%s)", store.root, make_key(base), base)
    record = {"applied": True, "reason": decision.reason, "split_block": decision.split_block,
              "store": str(store.root) if store.root else None, "store_key": make_key(base), "dtype": dtype,
              "compute_s": seconds, "reused": all(reused), "shards": dist.world().size}
    log.info("frozen prefix%s: outputs of %d images %s in %.1fs; %s train on them",
             f" (up to block {decision.split_block})" if decision.split_block else " (the whole backbone)",
             sum(len(getattr(cached, s)) for s in ("train", "val", "test")),
             "reused from the feature store" if all(reused) else "computed once", seconds,
             "the suffix and the head(s)" if suffix is not None else "the head(s)")
    return cached, SuffixNet(model, suffix), record


def compute_key(opts: LoopOptions) -> dict:
    """How the prefix outputs were computed, as far as it changes them: bf16/fp16 autocast, or a GPU
    (other kernels, TF32) give other numbers than 32-bit on a CPU, so their entries are apart.
    Empty for 32-bit on a CPU, which keeps the keys of the entries stored before this part."""
    if opts.device.type == "cpu" and opts.dtype is None:
        return {}
    return {"compute": f"{opts.device.type}:{str(opts.dtype or torch.float32).removeprefix('torch.')}"}


def _n_items(cfg: Config, name: str, n: int) -> int:
    limit = cfg.trainer.limit_train_batches if name == "train" else cfg.trainer.limit_eval_batches
    return n if not limit else min(n, limit * cfg.batch_size)


def _image_split(bundle, name: str, mirror: bool):
    """The split's images through the *eval* transform (never augmented), mirrored if asked."""
    ds = getattr(bundle, name)
    if hasattr(ds, "variant"):  # the tensor path (data.ImageSplit): its transform is deterministic here
        return ds.variant(flip=False, mirror=mirror)
    if not mirror and not isinstance(ds, SplitDataset):
        return ds  # precomputed tensors of the eval transform
    return SplitDataset(bundle.source, ds.indices, list(bundle.tasks), bundle.eval_transform, mirror=mirror)


def _image_batches(ds, items: range, batch: int, device):
    """The images ``items`` of ``ds`` in order, a batch at a time: in-memory splits are moved to
    the device once and sliced (no per-item ``__getitem__``); others go through a DataLoader."""
    if getattr(ds, "in_memory", False):
        ds = ds.to(device) if device.type == "cuda" else ds
        for a in range(0, len(items), batch):
            yield ds[list(items[a:a + batch])][0]
        return
    for x, _ in DataLoader(torch.utils.data.Subset(ds, items), batch_size=batch, shuffle=False):
        yield x


def _sharded_pass(store, parts: dict, prefix, images, n: int, cfg: Config, opts: LoopOptions, dtype):
    """DDP: the one-off prefix pass split across the ranks (rank r: items r, r + N, ...) and
    gathered into index order on every rank; a rank whose store lacks the entry writes it (under
    the store's lock: one writer per entry on a shared store). Read from the stores when every
    rank has it. Returns (array, reused)."""
    key, w = make_key(parts), dist.world()
    found = store.lookup(key)
    if all(dist.all_gather(found is not None)):
        return found, True
    mine = _prefix_pass(prefix, images, n, cfg, opts, dtype, items=range(w.rank, n, w.size))
    full = dist.interleave(dist.all_gather(mine))
    if found is None and store.root is not None:
        store.get_or_create(key, lambda: full, parts)
    return full, False


def _prefix_pass(prefix, ds, n: int, cfg: Config, opts: LoopOptions, dtype, path=None,
                 items: Optional[range] = None) -> Optional[np.ndarray]:
    """The prefix over the first ``n`` items of ``ds`` (or over ``items``, a rank's shard):
    returned as one array, or, with ``path``, written batch by batch into a memory-mapped ``.npy``
    there (never all in memory)."""
    out, mm, i = [], None, 0
    items = range(n) if items is None else items
    n = len(items)
    batch = max(cfg.batch_size, 64)
    log.info("frozen prefix: computing the outputs of %d images (once)", n)
    with torch.inference_mode():
        for x in progress.bar(_image_batches(ds, items, batch, opts.device), total=-(-n // batch),
                              desc=f"frozen prefix ({n} images)", unit="batch"):
            with autocast(opts):
                h = prefix(batch_to(x, opts))
            h = h.to(TORCH_DTYPES[dtype]).cpu().numpy()  # converted on the device: half the bytes to copy
            if path is None:
                out.append(h)
                continue
            if mm is None:
                mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *h.shape[1:]))
            mm[i:i + len(h)] = h
            i += len(h)
    if path is not None:
        if mm is None:
            np.save(path, np.zeros((0,), dtype=dtype))
        else:
            mm.flush()
            del mm
        return None
    return np.concatenate(out) if out else np.zeros((0,), dtype=dtype)
