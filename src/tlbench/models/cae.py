"""The convolutional autoencoder (``model=cae``): the scratch CNN's stages as the encoder, a
mirror of transposed convolutions as the decoder.

The encoder *is* a :class:`~tlbench.models.scratch.ScratchCNN` built from the same ``model.*``
keys (``channels``, ``convs_per_stage``, ``batch_norm``, ``in_chans``, ``dropout``), so its
tensors carry the names a ``model=cnn`` backbone has (``stages.0.0.weight`` ...) and load into
it exactly (``model.init_from``, :mod:`tlbench.transfer`). The decoder reads the last stage's
spatial output (before the cnn's global pooling): an optional 1x1 ``code`` conv to
``model.latent`` channels, then per encoder stage, in reverse, ``ConvTranspose2d(k=2, s=2)``
[BN] ReLU back to the previous width, then a 3x3 conv to the input channels. Its output is a
logit per pixel and channel; ``sigmoid`` of it is the reconstruction, an image in [0, 1]
(:mod:`tlbench.recon` says what it is compared with). Pooling rounds up (``ceil_mode``), so the
decoder's output is at least the input's size and is cropped to it (odd sizes: 28 -> 14 -> 7).

The model has the shape the rest of tlbench expects of a :class:`~tlbench.models.base.TLModel`:
``backbone`` (the encoder, whose ``blocks()`` the freeze policies use), ``heads`` (one entry,
``reconstruction``: the decoder, trained like a head) and ``forward(x) -> {task: output}``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .scratch import ScratchCNN

RECON_TASK = "reconstruction"


class Decoder(nn.Module):
    """Encoder output (B, channels[-1], h, w) -> logits (B, in_chans, >= H, >= W)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = list(cfg.channels)
        c_in = widths[-1]
        self.code = None
        if cfg.latent:
            self.code = nn.Sequential(nn.Conv2d(c_in, cfg.latent, 1), nn.ReLU(inplace=True))
            c_in = cfg.latent
        ups = []
        for c_out in reversed(widths):
            layers: list[nn.Module] = [nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=not cfg.batch_norm)]
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
            ups.append(nn.Sequential(*layers))
            c_in = c_out
        self.ups = nn.Sequential(*ups)
        self.out = nn.Conv2d(c_in, cfg.in_chans, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.code is not None:
            z = self.code(z)
        return self.out(self.ups(z))


class CAE(nn.Module):
    """Encoder (a ScratchCNN) + decoder; ``forward(x) -> {"reconstruction": logits}`` with the
    logits cropped to ``x``'s height and width."""

    reconstructs = True  # tlbench.features: no frozen-prefix cache (the decoder needs the spatial map)

    def __init__(self, cfg: ModelConfig, encoder: ScratchCNN | None = None):
        super().__init__()
        self.backbone = encoder if encoder is not None else ScratchCNN(cfg)
        self.heads = nn.ModuleDict({RECON_TASK: Decoder(cfg)})
        self.heads_dist = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's spatial output: what a cnn's backbone computes before its global pooling."""
        return self.backbone.stages(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        return {RECON_TASK: self.heads[RECON_TASK](self.encode(x))[..., :h, :w]}
