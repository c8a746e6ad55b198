"""CIFAR-10 in torchvision's layout: ``ROOT/cifar-10-batches-py/`` python pickles.

The batches are read here with a restricted unpickler: only the numpy array / dtype
constructors the official files use are allowed, so a crafted ``data_batch_1`` cannot run
code (an unrestricted ``pickle.load``, as torchvision's :class:`~torchvision.datasets.CIFAR10`
does, would). torchvision is used for its constants and, with ``dataset.download=true``,
for fetching the official archive (md5-checked), never for reading. The md5 sums of the
batches are checked here as a warning: subsets in the official format (e.g. the shared test
data) cannot match the official checksums.
"""

from __future__ import annotations

import codecs
import logging
import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10  # constants only (folder, file names, md5 sums, url)
from torchvision.datasets.utils import check_integrity

from .. import net
from ..config import DatasetConfig
from ..errors import TlbenchError
from ._common import dataset_root
from .base import DatasetMeta, Source

log = logging.getLogger(__name__)

FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
TRAIN_FILES = [name for name, _ in CIFAR10.train_list]  # data_batch_1..5
TEST_FILES = [name for name, _ in CIFAR10.test_list]  # test_batch
META_FILE = CIFAR10.meta["filename"]  # batches.meta
CHECKSUMS = dict(CIFAR10.train_list + CIFAR10.test_list + [[META_FILE, CIFAR10.meta["md5"]]])
FILES = list(CHECKSUMS)  # data_batch_1..5, test_batch, batches.meta
LAYOUT = f"ROOT/{FOLDER}/{{data_batch_1, ..., data_batch_5, test_batch, batches.meta}}"
DOWNLOAD_HINT = "Set dataset.download=true to fetch CIFAR-10 (163 MB) with torchvision's downloader."
FORMAT = ("the official python-version batches: dicts with 'data' (N x 3072 uint8) and 'labels', "
          "and 'label_names' in batches.meta")

# label_names of the official batches.meta (torchvision reads them from the file; this copy lets
# `tlbench plan` name the classes without the data)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SIZE = 32

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array unpickling helper


def _numpy_attr(*candidates: str):
    """The first of ``module:name`` that exists in this numpy (numpy 1 ``core``, numpy 2 ``_core``)."""
    import importlib

    for c in candidates:
        module, name = c.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


# What a CIFAR-10 pickle may name: numpy's array, dtype and scalar constructors (written by
# Python 2 / numpy 1 as numpy.core.multiarray, by numpy 2 as numpy._core) and, for batches
# re-pickled by Python 3 with protocol <= 2, the bytes helper _codecs.encode. None of them runs
# code of the file's choosing; everything else is refused.
_SCALAR = _numpy_attr("numpy._core.multiarray:scalar", "numpy.core.multiarray:scalar")
_FROMBUFFER = _numpy_attr("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")
ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("_codecs", "encode"): codecs.encode,
}
if _SCALAR is not None:
    ALLOWED[("numpy.core.multiarray", "scalar")] = ALLOWED[("numpy._core.multiarray", "scalar")] = _SCALAR
if _FROMBUFFER is not None:
    ALLOWED[("numpy.core.numeric", "_frombuffer")] = ALLOWED[("numpy._core.numeric", "_frombuffer")] = _FROMBUFFER


class _Refused(Exception):
    """The pickle names something a CIFAR-10 batch never holds."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _unpickle(path: Path) -> dict:
    """One CIFAR-10 pickle, read with the restricted unpickler; TlbenchError naming the file."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise TlbenchError(
            f"cannot read the CIFAR-10 pickles: {path} refers to {e}, which an official CIFAR-10 batch never "
            "does; it was refused unread, because unpickling it could run code. Only numpy arrays, lists, "
            f"dicts, strings and numbers are read from these files. They must be {FORMAT}; replace the file "
            "with the official one (remove the folder and re-download with dataset.download=true)"
        ) from None
    except OSError as e:
        raise TlbenchError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - truncated / not a pickle / inconsistent numpy state
        raise TlbenchError(
            f"cannot read the CIFAR-10 pickles: {path} is not a readable pickle ({type(e).__name__}: "
            f"{str(e)[:200]}); they must be {FORMAT}. Remove the folder and re-download with dataset.download=true."
        ) from None


def _bad(path: Path, what: str) -> TlbenchError:
    return TlbenchError(f"cannot read the CIFAR-10 pickles: {path} {what}; they must be {FORMAT}. Remove the "
                        "folder and re-download with dataset.download=true.")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N int64) of one batch file."""
    entry = _unpickle(path)
    if not isinstance(entry, dict):
        raise _bad(path, f"holds a {type(entry).__name__}, not a dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072:
        raise _bad(path, "has no 'data' array of uint8 with 3072 values per image")
    if labels is None:
        raise _bad(path, "has no 'labels'")
    try:
        labels = np.asarray(labels)
    except Exception:  # noqa: BLE001 - ragged or odd objects
        raise _bad(path, "has 'labels' that are not a list of integers") from None
    n = data.size // 3072
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != n:
        raise _bad(path, f"has {len(labels) if labels.ndim == 1 else 'no list of'} integer labels for {n} images")
    images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as torchvision's reader
    return images, labels.astype(np.int64)


def _read_classes(path: Path) -> list[str]:
    meta = _unpickle(path)
    if isinstance(meta, dict):
        meta = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in meta.items()}
    names = meta.get(CIFAR10.meta["key"]) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(c, (str, bytes)) for c in names):
        raise _bad(path, "has no 'label_names' list")
    return [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in names]


def _find_root(cfg: DatasetConfig) -> Path:
    """The folder that holds ``cifar-10-batches-py`` (root may also name that folder itself)."""
    root = dataset_root(cfg, LAYOUT, DOWNLOAD_HINT, must_exist=not cfg.download)
    if root.name == FOLDER and (root / FILES[0]).is_file():
        return root.parent
    return root


def _missing(root: Path) -> list[str]:
    return [name for name in FILES if not (root / FOLDER / name).is_file()]


def _require_files(root: Path) -> None:
    """TlbenchError listing the files that are missing."""
    missing = _missing(root)
    if missing:
        raise TlbenchError(
            f"CIFAR-10 files missing in {root / FOLDER}: {', '.join(missing)}. Expected layout (ROOT = "
            f"dataset.root = {root}): {LAYOUT}. {DOWNLOAD_HINT}"
        )


def _download(root: Path) -> None:
    """Fetch and unpack the official archive (md5-checked by torchvision) unless every file is there."""
    if not _missing(root):
        return
    from torchvision.datasets import cifar as tv_cifar  # looked up at call time (tests patch it)

    why = net.unreachable(CIFAR10.url)  # one quick connect per process, not a hanging download
    if why:
        raise TlbenchError(
            f"dataset.download=true could not fetch CIFAR-10 from {CIFAR10.url} into {root}: {why}; "
            f"without internet access, unpack cifar-10-python.tar.gz there by hand. Expected layout: {LAYOUT}"
        )
    try:
        tv_cifar.download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename,
                                              md5=CIFAR10.tgz_md5)
    except (OSError, RuntimeError) as e:  # no network, bad archive, md5 mismatch ...
        raise TlbenchError(
            f"dataset.download=true could not fetch CIFAR-10 from {CIFAR10.url} into {root} ({e}); "
            f"without internet access, unpack cifar-10-python.tar.gz there by hand. Expected layout: {LAYOUT}"
        ) from None


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


def load(cfg: DatasetConfig) -> Source:
    """CIFAR-10 train batches then the test batch; ``official_test`` = the test batch items."""
    root = _find_root(cfg)
    if cfg.download:
        _download(root)
    _require_files(root)
    folder = root / FOLDER
    classes = _read_classes(folder / META_FILE)
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    test = [_read_batch(folder / name) for name in TEST_FILES]
    _warn_checksums(root)
    n_train = sum(len(lab) for _, lab in train)
    images = np.concatenate([img for img, _ in train + test]).astype(np.uint8, copy=False)
    labels = np.concatenate([lab for _, lab in train + test])
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if len(bad):
        raise TlbenchError(
            f"CIFAR-10 in {folder} has label {int(bad[0])} but batches.meta names only "
            f"{len(classes)} classes ({', '.join(classes)}); the files are inconsistent"
        )
    log.info("CIFAR-10 from %s: %d train + %d test images", folder, n_train, len(images) - n_train)
    return Source(
        tasks={"label": classes},
        labels={"label": labels},
        images=images,
        root=str(root),
        official_test=np.arange(n_train, len(images)),
        default_task="label",
    )


def meta(cfg: DatasetConfig) -> DatasetMeta:
    """The class names from ``batches.meta`` when it is on disk (a small pickle; no image is
    read), else the official CIFAR-10 list: a plan needs no data."""
    path = None
    if cfg.root is not None and str(cfg.root).strip():
        root = dataset_root(cfg, LAYOUT, DOWNLOAD_HINT, must_exist=False)
        if root.name == FOLDER and (root / FILES[0]).is_file():  # as _find_root
            root = root.parent
        path = root / FOLDER / META_FILE
    if path is not None and path.is_file():
        return DatasetMeta(tasks={"label": _read_classes(path)}, default_task="label", origin=str(path),
                           native_size=lambda: SIZE)
    where = f" (no {path})" if path is not None else ""
    return DatasetMeta(tasks={"label": list(CLASSES)}, default_task="label",
                       origin=f"the official CIFAR-10 class list{where}", native_size=lambda: SIZE)
