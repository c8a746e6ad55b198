"""From-scratch backbones: a configurable CNN and an MLP on flattened native-size input."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import TlbenchError
from .base import Backbone, InputSpec

SCRATCH_MEAN = (0.5, 0.5, 0.5)
SCRATCH_STD = (0.5, 0.5, 0.5)


def scratch_spec(cfg: ModelConfig) -> InputSpec:
    """Native size unless ``model.image_size`` is set; simple [-1, 1] normalization."""
    return InputSpec(
        size=cfg.image_size or 0, channels=cfg.in_chans, mean=SCRATCH_MEAN, std=SCRATCH_STD,
        resize=cfg.image_size is not None,
    )


class ScratchCNN(Backbone):
    """Stages of (conv3x3 [BN] ReLU) x convs_per_stage + max-pool, then global average pool.

    Blocks are ``stages.0`` .. ``stages.{n-1}``. With ``channels=(32,32,64,64,128,128)`` and
    ``convs_per_stage=1`` it is the 6-conv CIFAR course network; ``(32,64)`` is the small
    EMNIST/digits CNN.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        stages, c_in = [], cfg.in_chans
        for c_out in cfg.channels:
            layers: list[nn.Module] = []
            for _ in range(cfg.convs_per_stage):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not cfg.batch_norm))
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(nn.ReLU(inplace=True))
                c_in = c_out
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            if cfg.dropout > 0:
                layers.append(nn.Dropout2d(cfg.dropout))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c_in
        self.input_spec = scratch_spec(cfg)

    def blocks(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict((f"stages.{i}", m) for i, m in enumerate(self.stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(x)).flatten(1)


class ScratchMLP(Backbone):
    """Flatten the native-size image, then Linear-ReLU[-Dropout] per hidden size.

    The first layer is lazy (its input size is the image's C*H*W, known at the first
    forward); :func:`tlbench.models.build_model` runs that forward before training.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.hidden:
            raise TlbenchError("model.hidden is empty; the mlp needs at least one hidden size, e.g. [256,128]")
        layers = OrderedDict()
        for i, h in enumerate(cfg.hidden):
            lin = nn.LazyLinear(h) if i == 0 else nn.Linear(cfg.hidden[i - 1], h)
            parts = [lin, nn.ReLU(inplace=True)] + ([nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else [])
            layers[str(i)] = nn.Sequential(*parts)
        self.layers = nn.Sequential(layers)
        self.feature_dim = cfg.hidden[-1]
        self.input_spec = scratch_spec(cfg)

    def blocks(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict((f"layers.{i}", m) for i, m in enumerate(self.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))
