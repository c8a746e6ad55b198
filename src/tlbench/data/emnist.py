"""EMNIST in torchvision's layout: ``ROOT/EMNIST/raw/emnist-<split>-*-ubyte`` idx files.

The idx files are read here (uncompressed or ``.gz``); ``dataset.download=true`` goes
through :class:`torchvision.datasets.EMNIST`'s downloader. EMNIST images are stored
transposed in the idx files; they are returned upright.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
from torchvision.datasets import EMNIST

from .. import net
from ..config import DatasetConfig
from ..errors import TlbenchError, choices
from ._common import dataset_root
from .base import DatasetMeta, Source

log = logging.getLogger(__name__)

SPLITS = tuple(EMNIST.splits)  # byclass, bymerge, balanced, letters, digits, mnist
DEFAULT_SPLIT = "balanced"
LAYOUT = (
    "ROOT/EMNIST/raw/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz] "
    "(+ emnist-<split>-mapping.txt)"
)
DOWNLOAD_HINT = "Set dataset.download=true to fetch EMNIST (535 MB, all splits) with torchvision's downloader."
SIZE = 28  # every EMNIST split: 28x28
IDX_MAGIC = {"images-idx3": 2051, "labels-idx1": 2049}  # 0x0803 / 0x0801: uint8, 3 / 1 dims


def _split_name(cfg: DatasetConfig) -> str:
    split = cfg.split or DEFAULT_SPLIT
    if split not in SPLITS:
        raise TlbenchError(f"dataset.split={split!r} is not an EMNIST split; choose one of {choices(SPLITS)}")
    return split


def _file(raw: Path, split: str, part: str, kind: str) -> Optional[Path]:
    """``emnist-<split>-<part>-<kind>-ubyte`` or its ``.gz`` in ``raw``, None when absent."""
    name = f"emnist-{split}-{part}-{kind}-ubyte"
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _raw_folder(root: Path, split: str) -> Optional[Path]:
    """The folder holding the split's files: ROOT/EMNIST/raw (or root naming EMNIST/ or raw/)."""
    for raw in (root / "EMNIST" / "raw", root / "raw", root):
        if _file(raw, split, "train", "images-idx3") is not None:
            return raw
    return None


def _missing_error(root: Path, split: str) -> TlbenchError:
    raw = root / "EMNIST" / "raw"
    present = sorted(s for s in SPLITS if _raw_folder(root, s) is not None)
    found = ""
    if present:
        found = f" Files for split(s) {choices(present)} are there: set dataset.split accordingly."
    return TlbenchError(
        f"EMNIST split {split!r} not found: looked for {raw}/emnist-{split}-train-images-idx3-ubyte "
        f"(or .gz) under dataset.root={root}.{found} Expected layout: {LAYOUT}. {DOWNLOAD_HINT}"
    )


def _download(root: Path, split: str) -> None:
    """torchvision's EMNIST downloader (fetches the zip of all splits into ROOT/EMNIST/raw)."""
    why = net.unreachable(EMNIST.url)  # one quick connect per process, not a hanging download
    if why:
        raise TlbenchError(
            f"dataset.download=true could not fetch EMNIST from {EMNIST.url} into {root}: {why}; "
            f"without internet access, unzip gzip.zip there by hand. Expected layout: {LAYOUT}"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        EMNIST(str(root), split=split, train=True, download=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as e:  # no network, bad
        # archive, disk full, a legacy EMNIST/processed/*.pt that torchvision refuses (weights_only) ...
        raise TlbenchError(
            f"dataset.download=true could not fetch EMNIST from {EMNIST.url} into {root} ({e}); "
            f"without internet access, unzip gzip.zip there by hand. Expected layout: {LAYOUT}"
        ) from None


def read_idx(path: Path, kind: str) -> np.ndarray:
    """A uint8 idx file (``images-idx3`` -> (N,H,W), ``labels-idx1`` -> (N,)); checks its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise TlbenchError(f"cannot read EMNIST file {path}: {e}") from None
    want = IDX_MAGIC[kind]
    ndim = want & 0xFF
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != want:
        raise TlbenchError(
            f"{path} is not an idx {kind} file: its magic number is {magic}, expected {want} "
            "(big-endian uint8 idx); the file is corrupt or of another format"
        )
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise TlbenchError(
            f"{path} is truncated or padded: its header promises shape {shape} "
            f"({header + int(np.prod(shape))} bytes) but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def class_names(raw: Path, split: str) -> list[str]:
    """Class names in label order: from ``emnist-<split>-mapping.txt`` when present.

    Each mapping line is ``label code [code]``; the name is the character of the last code
    (lower case for ``letters``' merged upper/lower classes, as torchvision names them).
    Without the file, torchvision's class lists are used.
    """
    offset = 1 if split == "letters" else 0  # letters labels are 1..26 in the files
    path = raw / f"emnist-{split}-mapping.txt"
    if not path.is_file():
        names = list(EMNIST.classes_split_dict[split])
        return names[offset:]
    mapping = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            mapping[int(fields[0])] = chr(int(fields[-1]))
        except (ValueError, IndexError, OverflowError):
            raise TlbenchError(f"{path} line {lineno} is {line!r}; expected 'LABEL ASCII_CODE'") from None
    expected = list(range(offset, offset + len(mapping)))
    if sorted(mapping) != expected:
        raise TlbenchError(f"{path} must map the labels {expected[0]}..{expected[-1]} exactly once each")
    return [mapping[i] for i in expected]


def _read_part(raw: Path, split: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    paths = {kind: _file(raw, split, part, kind) for kind in IDX_MAGIC}
    for kind, path in paths.items():
        if path is None:
            raise TlbenchError(f"EMNIST file missing: {raw}/emnist-{split}-{part}-{kind}-ubyte (or .gz)")
    images = read_idx(paths["images-idx3"], "images-idx3")
    labels = read_idx(paths["labels-idx1"], "labels-idx1")
    if len(images) != len(labels):
        raise TlbenchError(
            f"EMNIST {split} {part}: {paths['images-idx3'].name} has {len(images)} images but "
            f"{paths['labels-idx1'].name} has {len(labels)} labels"
        )
    return images, labels


def load(cfg: DatasetConfig) -> Source:
    """EMNIST ``dataset.split`` train then test images, upright; ``official_test`` = test."""
    split = _split_name(cfg)
    root = dataset_root(cfg, LAYOUT, DOWNLOAD_HINT, must_exist=not cfg.download)
    raw = _raw_folder(root, split) if root.is_dir() else None
    if raw is None and cfg.download:
        _download(root, split)
        raw = _raw_folder(root, split)
    if raw is None:
        raise _missing_error(root, split)
    train_x, train_y = _read_part(raw, split, "train")
    test_x, test_y = _read_part(raw, split, "test")
    names = class_names(raw, split)
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    if split == "letters":
        labels -= 1  # letters labels are 1-based in the files (1=a .. 26=z); 0-based here
    bad = labels[(labels < 0) | (labels >= len(names))]
    if len(bad):
        shown = int(bad[0]) + (1 if split == "letters" else 0)
        raise TlbenchError(
            f"EMNIST {split} in {raw} has label {shown} in its labels file, outside the "
            f"{len(names)} classes of the split ({''.join(names)}); the files are inconsistent"
        )
    # the idx files store every image transposed (column-major); transpose back to upright
    images = np.ascontiguousarray(np.concatenate([train_x, test_x]).transpose(0, 2, 1))
    log.info("EMNIST %s from %s: %d train + %d test images, %d classes",
             split, raw, len(train_x), len(test_x), len(names))
    return Source(
        tasks={"label": names},
        labels={"label": labels},
        images=images,
        root=str(root),
        official_test=np.arange(len(train_x), len(images)),
        default_task="label",
    )


def meta(cfg: DatasetConfig) -> DatasetMeta:
    """The split's class names from its mapping file when on disk, else torchvision's list for
    the split (as :func:`class_names`); no image is read, and no data is needed."""
    split = _split_name(cfg)
    raw = None
    if cfg.root is not None and str(cfg.root).strip():
        root = dataset_root(cfg, LAYOUT, DOWNLOAD_HINT, must_exist=False)
        raw = _raw_folder(root, split) if root.is_dir() else None
    if raw is not None and (raw / f"emnist-{split}-mapping.txt").is_file():
        origin = str(raw / f"emnist-{split}-mapping.txt")
    else:
        origin = f"torchvision's EMNIST {split} class list"
    names = class_names(raw if raw is not None else Path(os.devnull), split)
    return DatasetMeta(tasks={"label": names}, default_task="label", origin=origin, native_size=lambda: SIZE)
