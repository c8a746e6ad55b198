"""Frozen-backbone features computed once: when no backbone parameter trains and the input
is a fixed function of the image, each split goes through the backbone once and the heads
train on the stored features."""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch.utils.data import DataLoader

from .config import Config
from .engine import LoopOptions, autocast

log = logging.getLogger(__name__)


def backbone_frozen(model) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def can_cache_features(cfg: Config, model) -> bool:
    """The backbone is a fixed function of the image: no trainable parameter, no random
    augmentation, no gradual unfreezing, BatchNorm statistics fixed (``freeze.bn=eval``). Then
    its features are computed once."""
    return (cfg.trainer.cache_features and cfg.dataset.augment == "none" and not cfg.freeze.gradual
            and cfg.freeze.bn != "train" and backbone_frozen(model))


def cache_features(cfg: Config, bundle, model, opts: LoopOptions):
    """Run the frozen backbone once over each split; train/evaluate the heads on the result.
    Returns the bundle of features (same labels and indices) and the seconds the pass took."""
    from .data import TensorSplit

    t0 = time.perf_counter()
    model.eval()
    cached = copy.copy(bundle)
    limits = {"train": cfg.trainer.limit_train_batches, "val": cfg.trainer.limit_eval_batches,
              "test": cfg.trainer.limit_eval_batches}
    for name in ("train", "val", "test"):
        ds = getattr(bundle, name)
        n = len(ds) if not limits[name] else min(len(ds), limits[name] * cfg.batch_size)
        sub = torch.utils.data.Subset(ds, range(n))
        feats = []
        with torch.inference_mode():
            for x, _ in DataLoader(sub, batch_size=max(cfg.batch_size, 64), shuffle=False):
                with autocast(opts):
                    feats.append(model.features(x.to(opts.device)).float().cpu())
        labels = {t: ds.labels[t][:n] for t in bundle.tasks}
        setattr(cached, name, TensorSplit(torch.cat(feats), labels, ds.indices[:n]))
    model.inputs_are_features = True
    seconds = time.perf_counter() - t0
    log.info("frozen backbone: features of %d images computed once in %.1fs; the head(s) train on them",
             sum(len(getattr(cached, s)) for s in ("train", "val", "test")), seconds)
    return cached, seconds
