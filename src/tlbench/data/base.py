"""What every dataset loader returns, and what the loop consumes.

A loader reads a dataset in its official on-disk format and returns a :class:`Source`:
all items with their labels per task, before any split. ``build_data`` (data/__init__.py)
then selects tasks, splits, applies transforms and returns a :class:`DataBundle`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image


@dataclass
class Source:
    """A dataset as found on disk, before splitting.

    ``images`` is either a uint8 array (N,H,W) / (N,H,W,C) held in memory, or a list
    of absolute file paths. ``labels[task]`` holds one int label per item for every task
    the dataset can provide; ``tasks[task]`` the class names in label order.
    """

    tasks: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    images: "np.ndarray | list[str]"
    root: Optional[str] = None
    relpaths: Optional[list[str]] = None  # file datasets: path relative to root, per item
    official_test: Optional[np.ndarray] = None  # indices of the format's own test split
    default_task: Optional[str] = None  # task used when dataset.task is not set
    skipped: list[str] = field(default_factory=list)  # bad files skipped (on_bad_image=skip)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Image.Image:
        img = self.images[i]
        if isinstance(img, str):
            with Image.open(img) as im:
                im.load()
                return _flatten_alpha(im)
        return Image.fromarray(np.asarray(img))

    def fingerprint(self, splits: dict[str, Sequence[int]]) -> str:
        """Hash of the item identities, their labels and the split indices."""
        h = hashlib.sha256()
        if self.relpaths is not None:
            for p in self.relpaths:
                h.update(p.encode() + b"\0")
        else:
            h.update(np.ascontiguousarray(self.images).tobytes())
        for task in sorted(self.labels):
            h.update(task.encode())
            h.update(np.asarray(self.labels[task], dtype=np.int64).tobytes())
        for name in sorted(splits):
            h.update(name.encode())
            h.update(np.asarray(splits[name], dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def unpack(item) -> tuple[int, bool]:
    """A dataset item request: an index, or ``(index, flip)`` from the training sampler."""
    return (int(item[0]), bool(item[1])) if isinstance(item, tuple) else (int(item), False)


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale (PNG/TIFF) as Pillow opens it


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grayscale (Pillow's ``I;16*``, and ``I``, read as 16-bit) -> 8-bit ``L``, scaled by
    1/257 and rounded (65535 -> 255). Pillow's own ``convert`` would clip every value above 255.
    Other modes are returned unchanged (16-bit RGB(A) PNGs already open as 8-bit RGB(A))."""
    if im.mode not in HIGH_DEPTH_MODES:
        return im
    a = np.asarray(im).astype(np.int64)  # I;16B etc. decode to native integers here
    a = np.clip(a, 0, 65535)
    return Image.fromarray(((a + 128) // 257).astype(np.uint8))  # 2-d uint8: mode L


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """16-bit grayscale to 8-bit (:func:`to_8bit`); RGBA/LA/P-with-transparency onto a white
    background; everything else unchanged."""
    im = to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        bg.alpha_composite(im.convert("RGBA"))
        return bg.convert("RGB")
    if im.mode not in ("L", "RGB"):
        return im.convert("RGB")
    return im


@dataclass
class DatasetMeta:
    """What is known about a dataset without reading its images (``tlbench plan``): every task
    with its class names in label order (as :class:`Source` would hold them), the default task,
    where the names came from, and the first item's native size (a callable: file datasets read
    one image header for it, so it is asked only when a model's size depends on it)."""

    tasks: dict[str, list[str]]
    default_task: str
    origin: str  # e.g. "batches.meta in ROOT/cifar-10-batches-py", "class folders under ROOT"
    native_size: Callable[[], int]


@dataclass
class DataBundle:
    """train/val/test datasets yielding ``(image_tensor, {task: label})``, plus metadata."""

    train: object
    val: object
    test: object
    tasks: dict[str, list[str]]  # selected task -> class names
    splits: dict[str, list[int]]  # split -> indices into the source
    source: Source
    fingerprint: str
    class_counts: dict[str, dict[str, dict[str, int]]]  # split -> task -> class -> count
    class_weights: Optional[dict[str, list[float]]] = None
    eval_transform: Optional[object] = None  # image -> tensor, deterministic (eval of other items)
    pipeline: Optional[dict] = None  # the data path taken and why (data/pipeline.py; results.json "speed")
    # dataset.train_fraction / train_per_class: what was kept of the training split (None: all of it)
    train_subset: Optional[dict] = None
