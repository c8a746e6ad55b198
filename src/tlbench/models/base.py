"""The backbone adapter shape and the model the loop trains.

Every backbone (scratch CNN/MLP, torchvision, timm) is wrapped as a :class:`Backbone`:
``forward(x) -> (B, feature_dim)`` features, ``blocks`` (the named stages a freeze policy
may train), ``input_spec`` (size, channels, normalization) and ``weights_source``.
:class:`TLModel` puts one head per task on top and returns ``{task: logits}``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TlbenchError, choices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What the backbone expects: square size, channels, normalization."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: bool = True  # False: feed images at their native size (scratch models)


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement ``forward``."""

    feature_dim: int
    input_spec: InputSpec
    weights_source: str = "random init"
    num_feature_outputs: int = 1  # 2 for distilled DeiT: forward returns (cls, dist) features

    def blocks(self) -> "OrderedDict[str, nn.Module]":
        """Ordered named stages, first to last (names are dotted module paths)."""
        raise NotImplementedError


def make_head(in_dim: int, out_dim: int, hidden=(), dropout: float = 0.0, activation: str = "relu") -> nn.Module:
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "tanh": nn.Tanh, "silu": nn.SiLU}
    if activation not in acts:
        raise TlbenchError(f"head.activation={activation!r} is not valid; choose one of {choices(acts)}")
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), acts[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    if dropout > 0 and not hidden:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers) if len(layers) > 1 else layers[0]


class TLModel(nn.Module):
    """Backbone + one head per task; ``forward(x) -> {task: logits}`` (always logits)."""

    def __init__(self, backbone: Backbone, tasks: dict[str, int], head_cfg=None):
        super().__init__()
        self.backbone = backbone
        hidden = tuple(getattr(head_cfg, "hidden", ()) or ())
        dropout = float(getattr(head_cfg, "dropout", 0.0) or 0.0)
        act = getattr(head_cfg, "activation", "relu") or "relu"
        self.heads = nn.ModuleDict(
            {t: make_head(backbone.feature_dim, n, hidden, dropout, act) for t, n in tasks.items()}
        )
        # distilled backbones (DeiT) get a second head per task on the distillation token
        if backbone.num_feature_outputs == 2:
            self.heads_dist = nn.ModuleDict(
                {t: make_head(backbone.feature_dim, n, hidden, dropout, act) for t, n in tasks.items()}
            )
        else:
            self.heads_dist = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features as one tensor: (B, D), or (B, 2, D) for distilled backbones."""
        f = self.backbone(x)
        return torch.stack(f, 1) if isinstance(f, (tuple, list)) else f

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads_forward(self.backbone(x))

    def heads_forward(self, feats) -> dict[str, torch.Tensor]:
        """The heads on backbone features: a tensor (B, D), or for distilled backbones the pair
        ``(cls, dist)`` (or the two stacked as (B, 2, D), as :meth:`features` returns them)."""
        if self.heads_dist is not None and isinstance(feats, torch.Tensor):
            feats = (feats[:, 0], feats[:, 1])
        if self.heads_dist is None:
            return {t: h(feats) for t, h in self.heads.items()}
        cls_f, dist_f = feats
        out = {}
        for t in self.heads:
            a, b = self.heads[t](cls_f), self.heads_dist[t](dist_f)
            # train: both heads learn the label (loss averaged over the pair); eval: mean of logits
            out[t] = (a + b) / 2 if not self.training else torch.stack([a, b])
        return out
