"""DDP needs every trainable parameter to get a gradient each step (tlbench wraps models without
``find_unused_parameters``). This checks every shipped model config, fully trainable and randomly
initialized (no weights needed): one forward and backward on two random images, then lists the
trainable parameters that got no gradient. Exit 1 when any has one.

    .venv/bin/python scripts/check_unused_params.py        # ~30 s on 2 CPU cores
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tlbench.compose import compose  # noqa: E402
from tlbench.models import build_backbone, build_task_model  # noqa: E402
from tlbench.registry import MODELS  # noqa: E402


def unused(name: str) -> list[str]:
    cfg = compose([f"model={name}", "model.pretrained=false", "freeze=full"])
    backbone = build_backbone(cfg.model)
    size = backbone.input_spec.size or 32
    x = torch.randn(2, backbone.input_spec.channels, size, size)
    tasks = {"reconstruction": 0} if MODELS[name].task == "reconstruction" else {"label": 10}
    model = build_task_model(cfg.model, backbone, tasks, cfg.head, x)
    sum(v.float().sum() for v in model(x).values()).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def main() -> int:
    bad = 0
    for name in sorted(n for n, m in MODELS.items() if m.arch is not None or m.family == "scratch"):
        found = unused(name)
        bad += bool(found)
        print(f"{name:22s} {'ok' if not found else f'{len(found)} unused: ' + ', '.join(found[:5])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
