"""Building a run's parts from the config, with no training state: seeding, data + model +
freeze plan (``build_everything``), and ``tlbench download``. Used by ``run``, ``evaluate`` and
``plan`` alike."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from . import __version__, progress
from .config import Config, is_reconstruction
from .data import build_data, load_source
from .freeze import apply_freeze
from .models import build_backbone, build_task_model
from .models.backbones import download_weights
from .models.cae import RECON_TASK
from .registry import DATASETS, MODELS
from .store import open_store
from .transfer import apply as apply_transfer
from .validation import check_tasks


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        # cuBLAS is deterministic only with a fixed workspace, set before its first use (torch's
        # "Reproducibility" notes); otherwise every CUDA matmul warns and may differ between runs
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def versions() -> dict:
    import torchvision

    try:
        import timm

        timm_v = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        timm_v = None
    return {"tlbench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm_v}


def build_everything(cfg: Config):
    """Data, model and freeze plan from the config (no training state). A reconstruction run
    (``model=cae``) has one task, ``reconstruction``, with no classes (its labels are not used).
    ``model.init_from`` is loaded here, before the freeze plan (``transfer.apply``)."""
    backbone = build_backbone(cfg.model)
    recon = is_reconstruction(cfg)

    def check(tasks: dict, available: dict) -> None:  # eval.topk, eval.positive_class, 2+ classes per task
        check_tasks(cfg, {RECON_TASK: []} if recon else tasks, available)

    bundle = build_data(cfg.dataset, backbone.input_spec, open_store(cfg.trainer.feature_store), seed=cfg.seed,
                        check=check)
    if recon:
        bundle.tasks = {RECON_TASK: []}
    sample = torch.stack([bundle.train[i][0] for i in range(min(2, len(bundle.train)))])
    model = build_task_model(cfg.model, backbone, {t: len(n) for t, n in bundle.tasks.items()}, cfg.head, sample)
    apply_transfer(model, cfg, tuple(sample.shape[1:]))
    plan = apply_freeze(model, cfg.freeze, cfg.optim)
    return bundle, model, plan


def progress_enabled(cfg: Config) -> bool:
    """tqdm bars: wanted (``trainer.progress``, not ``--quiet``) and on a terminal."""
    return cfg.trainer.progress and progress.enabled()


def download(cfg: Config) -> list[str]:
    """``tlbench download``: fetch the model's pretrained weights and the dataset into their
    caches/roots (on a machine with network, for compute nodes that have none)."""
    import dataclasses

    done = []
    if MODELS[cfg.model.name].family != "scratch":
        done.append(f"weights for model={cfg.model.name}: {download_weights(cfg.model)}")
    if DATASETS[cfg.dataset.name].downloads:
        src = load_source(dataclasses.replace(cfg.dataset, download=True))
        done.append(f"dataset={cfg.dataset.name}: {len(src)} images in {cfg.dataset.root}")
    elif cfg.dataset.name != "sklearn_digits":
        done.append(f"dataset={cfg.dataset.name} has no downloader: put the folders under "
                    f"{cfg.dataset.root} (docs/datasets.md says where to get them)")
    return done
