"""CIFAR-10 in torchvision's layout: ``ROOT/cifar-10-batches-py/`` python pickles.

Reading goes through :class:`torchvision.datasets.CIFAR10` (and ``dataset.download=true``
through its downloader). Its md5 checks are done here instead, as a warning: subsets in
the official format (e.g. the shared test data) cannot match the official checksums.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from ..config import DatasetConfig
from ..errors import TlbenchError
from ._common import dataset_root
from .base import Source

log = logging.getLogger(__name__)

FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
CHECKSUMS = dict(CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]])
FILES = list(CHECKSUMS)  # data_batch_1..5, test_batch, batches.meta
LAYOUT = f"ROOT/{FOLDER}/{{data_batch_1, ..., data_batch_5, test_batch, batches.meta}}"
DOWNLOAD_HINT = "Set dataset.download=true to fetch CIFAR-10 (163 MB) with torchvision's downloader."


class _LenientCIFAR10(CIFAR10):
    """torchvision's reader with presence checks only; :func:`load` checks the md5 sums."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in FILES)

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        self.classes = [str(c) for c in data[self.meta["key"]]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _find_root(cfg: DatasetConfig) -> Path:
    """The folder that holds ``cifar-10-batches-py`` (root may also name that folder itself)."""
    root = dataset_root(cfg, LAYOUT, DOWNLOAD_HINT, must_exist=not cfg.download)
    if root.name == FOLDER and (root / FILES[0]).is_file():
        return root.parent
    return root


def _require_files(root: Path) -> None:
    """TlbenchError listing the files that are missing."""
    folder = root / FOLDER
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise TlbenchError(
            f"CIFAR-10 files missing in {folder}: {', '.join(missing)}. Expected layout (ROOT = "
            f"dataset.root = {root}): {LAYOUT}. {DOWNLOAD_HINT}"
        )


def _warn_checksums(root: Path) -> None:
    """Warn (once, naming the files) when the md5 sums differ from the official release."""
    folder = root / FOLDER
    mismatched = [name for name in FILES if not check_integrity(str(folder / name), CHECKSUMS[name])]
    if mismatched:
        log.warning(
            "CIFAR-10 in %s: md5 checksum check skipped for %s: the files differ from the official "
            "release (a subset or a modified copy?); loading them anyway",
            folder, ", ".join(mismatched),
        )


def _read(root: Path, train: bool, download: bool = False) -> _LenientCIFAR10:
    """One split through torchvision's reader (and downloader); failures become TlbenchError."""
    try:
        return _LenientCIFAR10(str(root), train=train, download=download)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as e:
        files = "data_batch_1..5 and batches.meta" if train else "test_batch and batches.meta"
        raise TlbenchError(
            f"cannot read the CIFAR-10 pickles {files} in {root / FOLDER} ({type(e).__name__}: {e}); "
            "they must be the official python-version batches: dicts with 'data' (N x 3072 uint8) "
            "and 'labels', and 'label_names' in batches.meta. Remove the folder and re-download "
            "with dataset.download=true."
        ) from None
    except (OSError, RuntimeError) as e:  # no network, bad archive, unreadable file ...
        if not download:
            raise TlbenchError(f"cannot read CIFAR-10 in {root / FOLDER}: {e}") from None
        raise TlbenchError(
            f"dataset.download=true could not fetch CIFAR-10 from {CIFAR10.url} into {root} ({e}); "
            f"without internet access, unpack cifar-10-python.tar.gz there by hand. Expected layout: {LAYOUT}"
        ) from None


def load(cfg: DatasetConfig) -> Source:
    """CIFAR-10 train batches then the test batch; ``official_test`` = the test batch items."""
    root = _find_root(cfg)
    if not cfg.download:
        _require_files(root)
    train = _read(root, train=True, download=cfg.download)  # torchvision skips present files
    test = _read(root, train=False)
    _warn_checksums(root)
    classes = list(train.classes)
    images = np.concatenate([train.data, test.data]).astype(np.uint8, copy=False)
    labels = np.asarray(list(train.targets) + list(test.targets), dtype=np.int64)
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if len(bad):
        raise TlbenchError(
            f"CIFAR-10 in {root / FOLDER} has label {int(bad[0])} but batches.meta names only "
            f"{len(classes)} classes ({', '.join(classes)}); the files are inconsistent"
        )
    n_train = len(train.data)
    log.info("CIFAR-10 from %s: %d train + %d test images", root / FOLDER, n_train, len(test.data))
    return Source(
        tasks={"label": classes},
        labels={"label": labels},
        images=images,
        root=str(root),
        official_test=np.arange(n_train, len(images)),
        default_task="label",
    )
