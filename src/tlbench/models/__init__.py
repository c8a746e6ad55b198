"""``build_backbone`` / ``build_model``: config -> :class:`TLModel` with one head per task."""

from __future__ import annotations

import torch

from ..config import HeadConfig, ModelConfig
from ..errors import choices, TlbenchError
from ..registry import MODELS, models
from .backbones import build_backbone as build_pretrainable
from .base import Backbone, InputSpec, TLModel
from .cae import CAE
from .scratch import ScratchCNN, ScratchMLP

# the from-scratch models by name (registry.MODELS): their class (the cae's backbone is its encoder, a cnn)
SCRATCH = {n: {"cnn": ScratchCNN, "mlp": ScratchMLP}[arch] for n, arch in models("scratch").items()}


def build_backbone(cfg: ModelConfig) -> Backbone:
    """Scratch models here; torchvision/timm/EfficientNet-Lite adapters in backbones.py."""
    if cfg.name in SCRATCH:
        unused = [k for k in ("truncate", "weights") if getattr(cfg, k)] + (
            ["pretrained"] if cfg.pretrained else [])
        if unused:
            raise TlbenchError(f"model.{unused[0]} does not apply to the from-scratch model {cfg.name!r}; "
                               "remove it, or choose a torchvision/timm backbone (tlbench list models)")
        return SCRATCH[cfg.name](cfg)

    if cfg.name not in MODELS:
        raise TlbenchError(f"model.name={cfg.name!r} is not a known model; choose one of "
                           f"{choices(MODELS)} (tlbench list models)")

    return build_pretrainable(cfg)


def build_model(backbone: Backbone, tasks: dict[str, int], head: HeadConfig, sample: torch.Tensor) -> TLModel:
    """Put the heads on; run one forward on ``sample`` (a batch) to materialize lazy layers."""
    model = TLModel(backbone, tasks, head)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(sample)
    model.train(was_training)
    return model


def build_task_model(cfg: ModelConfig, backbone: Backbone, tasks: dict[str, int], head: HeadConfig,
                     sample: torch.Tensor) -> torch.nn.Module:
    """The model a run trains: the autoencoder around ``backbone`` for ``model=cae`` (its one
    task is the reconstruction; ``tasks`` are not used), else ``backbone`` + one head per task."""
    if cfg.name == "cae":
        return CAE(cfg, backbone)
    return build_model(backbone, tasks, head, sample)


__all__ = ["Backbone", "InputSpec", "TLModel", "build_backbone", "build_model", "build_task_model"]
