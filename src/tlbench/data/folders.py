"""Image-file datasets laid out as class folders.

* ``image_folder``: ``ROOT/<class>/<image>`` (any depth below the class folder).
* ``chest_xray``: the same, or ``ROOT/train/<Class>/*`` + ``ROOT/test/<Class>/*`` where the
  test folder becomes the official test split (a Kaggle-style ``val/`` joins train).
* ``handwritten_digits``: ``ROOT/<Language>/<digit 0-9>/*``, tasks ``digit`` and ``language``.

Every image is opened and decoded once up front, so a corrupt file fails (or, with
``dataset.on_bad_image=skip``, is left out) before training starts, not mid-epoch. The layout
(class folders, class names, which files) is read first by listing folders only; ``meta_*``
(for ``tlbench plan``) stops there and opens no image.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from ..config import DatasetConfig
from ..errors import TlbenchError, choices
from ._common import dataset_root, select_names
from .base import DatasetMeta, Source

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IGNORED_DIRS = {"__MACOSX"}  # zip-tool debris
SPLIT_DIRS = ("train", "val", "test")
DIGITS = [str(d) for d in range(10)]
FOLDER_LAYOUT = "ROOT/<class>/<image>.png|jpg|... (one folder per class)"
CHEST_LAYOUT = "ROOT/<Class>/<image> or ROOT/train/<Class>/<image> + ROOT/test/<Class>/<image>"
DIGITS_LAYOUT = "ROOT/<Language>/<digit 0-9>/<image>.png (e.g. ROOT/Thai/7/a.png)"
Classes = dict[str, list[Path]]  # class folder name -> its image files


# ----------------------------------------------------------------------------- scanning
def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in IGNORED_DIRS


def subfolders(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p.name)), key=lambda p: p.name)


def image_files(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden ones skipped), in sorted path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        found += [Path(dirpath, f) for f in filenames if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: p.as_posix())


def scan_classes(folder: Path, cfg: DatasetConfig, layout: str) -> Classes:
    """``{class folder name: image files}`` for the class folders of ``folder``.

    A class folder without images, or a ``folder`` without class folders, is an error.
    """
    classes = {d.name: image_files(d) for d in subfolders(folder)}
    if not classes:
        loose = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
        what = f"holds {len(loose)} images directly but no class folders" if loose else "has no class folders"
        raise TlbenchError(
            f"{folder} {what}; dataset {cfg.name!r} expects one sub-folder per class: {layout}"
        )
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise TlbenchError(
            f"class folder {folder / empty[0]} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            f"any case); put its images there or remove the folder. Expected layout: {layout}"
        )
    return classes


# ----------------------------------------------------------------------------- verifying
def _open_error(path: Path) -> Optional[str]:
    """None when the image opens and decodes fully, else why not."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # Pillow raises many types on corrupt data (OSError, SyntaxError, ...)
        return f"{type(e).__name__}: {e}"
    return None


def find_bad_images(paths: list[Path]) -> list[tuple[Path, str]]:
    """``(path, reason)`` for every file that does not open and decode (checked in threads)."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_open_error, paths, chunksize=32))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


# ----------------------------------------------------------------------------- assembling
@dataclass
class _Items:
    """Files found so far with their labels per task and whether they are official test items."""

    tasks: dict[str, list[str]]
    paths: list[Path] = field(default_factory=list)
    labels: dict[str, list[int]] = field(default_factory=dict)
    test: list[bool] = field(default_factory=list)

    def add(self, files: list[Path], labels: dict[str, int], test: bool = False) -> None:
        self.paths += files
        for task, label in labels.items():
            self.labels.setdefault(task, []).extend([label] * len(files))
        self.test += [test] * len(files)


@dataclass
class _Layout:
    """A dataset's tree as listed (no image opened): tasks with class names, and the files in
    item order as ``(files, {task: label}, official test?)`` groups."""

    root: Path
    tasks: dict[str, list[str]]
    default_task: str
    groups: list[tuple[list[Path], dict[str, int], bool]] = field(default_factory=list)

    def items(self) -> _Items:
        items = _Items(tasks=self.tasks)
        for files, labels, test in self.groups:
            items.add(files, labels, test)
        return items

    def meta(self) -> DatasetMeta:
        first = next(f for files, _, _ in self.groups for f in files)  # the Source's item 0
        return DatasetMeta(tasks={t: list(n) for t, n in self.tasks.items()}, default_task=self.default_task,
                           origin=f"the folder names under {self.root}", native_size=_header_size(first))


def _header_size(path: Path) -> Callable[[], int]:
    """The larger side of the image at ``path``, from its header (Pillow opens lazily: no decoding)."""
    def size() -> int:
        try:
            with Image.open(path) as im:
                return int(max(im.size))
        except Exception as e:  # noqa: BLE001 - as _open_error
            raise TlbenchError(
                f"image file {path} cannot be opened ({type(e).__name__}: {e}); fix or remove it") from None
    return size


def _drop_bad(items: _Items, root: Path, cfg: DatasetConfig) -> tuple[np.ndarray, list[str]]:
    """Indices of the items to keep and relpaths of bad files (or TlbenchError, on_bad_image=error)."""
    bad = find_bad_images(items.paths)
    if bad and cfg.on_bad_image != "skip":
        listed = "; ".join(f"{p} ({why})" for p, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise TlbenchError(
            f"{len(bad)} image file(s) cannot be opened: {listed}{more}. Fix or remove them, or set "
            "dataset.on_bad_image=skip to leave unreadable images out (with a warning)."
        )
    bad_set = {p for p, _ in bad}
    skipped = [p.relative_to(root).as_posix() for p, _ in bad]
    if skipped:
        log.warning("skipped %d unreadable image file(s) under %s (dataset.on_bad_image=skip): %s%s",
                    len(skipped), root, ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
    keep = np.array([i for i, p in enumerate(items.paths) if p not in bad_set], dtype=np.int64)
    return keep, skipped


def _to_source(items: _Items, root: Path, cfg: DatasetConfig, default_task: str) -> Source:
    """Verify the images, drop bad ones if allowed, and build the :class:`Source`."""
    keep, skipped = _drop_bad(items, root, cfg)
    labels = {t: np.asarray(v, dtype=np.int64)[keep] for t, v in items.labels.items()}
    for task, names in items.tasks.items():
        counts = np.bincount(labels[task], minlength=len(names))
        if (counts == 0).any():
            empty = names[int(np.flatnonzero(counts == 0)[0])]
            raise TlbenchError(
                f"{task} {empty!r} has no readable images left under {root} after skipping "
                f"{len(skipped)} unreadable file(s); fix or replace those files"
            )
    paths = [items.paths[i] for i in keep]
    test = np.flatnonzero(np.asarray(items.test, dtype=bool)[keep])
    return Source(
        tasks={t: list(n) for t, n in items.tasks.items()},
        labels=labels,
        images=[str(p) for p in paths],
        root=str(root),
        relpaths=[p.relative_to(root).as_posix() for p in paths],
        official_test=test if len(test) else None,
        default_task=default_task,
        skipped=skipped,
    )


def _need_two(names: list[str], where: Path, cfg: DatasetConfig, layout: str) -> None:
    if len(names) >= 2:
        return
    picked = " after dataset.classes" if cfg.classes else ""
    nested = ""
    if len(names) == 1 and subfolders(where / names[0]) and not cfg.classes:
        nested = f" If {where / names[0]} holds the class folders, set dataset.root to it."
    raise TlbenchError(
        f"found {len(names)} class{picked} under {where} ({choices(names) or 'none'}); a classifier "
        f"needs at least 2 class folders. Expected layout: {layout}.{nested}"
    )


# ----------------------------------------------------------------------------- loaders
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # folder names that mean a split, not a class


def _not_pre_split(root: Path) -> None:
    """``image_folder`` learns its sub-folders as classes: a ``ROOT/train/`` + ``ROOT/test/`` tree
    became a 2-class task 'test' vs 'train', without a warning. Refused when every folder there
    is a split name (any case)."""
    names = [d.name for d in subfolders(root)]
    if not names or any(n.lower() not in SPLIT_NAMES for n in names):
        return
    train = next((n for n in names if n.lower() == "train"), names[0])
    others = [n for n in names if n != train]
    held = next((n for n in others if n.lower() == "test"), others[0] if others else None)
    later = (f", and score the held-out folder afterwards with tlbench eval RUN_DIR split=all "
             f"dataset.root={root / held}") if held else ""
    chest = ("dataset=chest_xray, which reads this layout with any class names (train/ for training and "
             "validation, test/ as the official test split, a val/ folder joins train)")
    odd = [n for n in names if n.lower() not in SPLIT_DIRS]
    if odd:
        chest += f" once {choices(odd)} is renamed to val or test"
    raise TlbenchError(
        f"the folders under {root} are all split names ({choices(names)}), so dataset=image_folder would learn "
        f"them as classes: {root} looks like a pre-split tree (ROOT/train/<class>/..., ROOT/test/<class>/...), "
        f"and image_folder reads one folder of class folders and makes its own val and test splits. Point "
        f"dataset.root at {root / train}{later}; or use {chest}"
    )


def _image_folder_layout(cfg: DatasetConfig) -> _Layout:
    root = dataset_root(cfg, FOLDER_LAYOUT, "dataset.download is not available for image folders.")
    _not_pre_split(root)
    found = scan_classes(root, cfg, FOLDER_LAYOUT)
    names = select_names(list(found), cfg.classes, "class", root)
    _need_two(names, root, cfg, FOLDER_LAYOUT)
    return _Layout(root, {"label": names}, "label",
                   [(found[name], {"label": label}, False) for label, name in enumerate(names)])


def load_image_folder(cfg: DatasetConfig) -> Source:
    """Any ``ROOT/<class>/<image>`` tree -> task ``label`` (class folder names, sorted)."""
    layout = _image_folder_layout(cfg)
    return _to_source(layout.items(), layout.root, cfg, layout.default_task)


def meta_image_folder(cfg: DatasetConfig) -> DatasetMeta:
    return _image_folder_layout(cfg).meta()


def _split_folders(root: Path) -> dict[str, Path]:
    """``{"train"|"val"|"test": folder}`` when root uses split folders (any case), else {}."""
    dirs = subfolders(root)
    splits = {d.name.lower(): d for d in dirs if d.name.lower() in SPLIT_DIRS}
    if not splits:
        return {}
    others = [d.name for d in dirs if d.name.lower() not in SPLIT_DIRS]
    if others or "train" not in splits:
        raise TlbenchError(
            f"{root} mixes split folders ({choices(d.name for d in splits.values())}) with other "
            f"folders ({choices(others) if others else 'no train/ folder'}); use either class folders "
            f"only or train/ and test/ (optionally val/) holding the class folders: {CHEST_LAYOUT}"
        )
    return splits


def _split_classes(splits: dict[str, Path], cfg: DatasetConfig) -> tuple[Classes, Classes]:
    """Train (+val) and test class files; test classes must exist in train (case-insensitive)."""
    train = scan_classes(splits["train"], cfg, CHEST_LAYOUT)
    by_key = {name.casefold(): name for name in train}
    extra: dict[str, Classes] = {}
    for part in ("val", "test"):
        if part in splits:
            extra[part] = scan_classes(splits[part], cfg, CHEST_LAYOUT)
            unknown = [n for n in extra[part] if n.casefold() not in by_key]
            if unknown:
                raise TlbenchError(
                    f"class folder {splits[part] / unknown[0]} has no counterpart in {splits['train']} "
                    f"(classes there: {choices(train)}); {part}/ and train/ must hold the same class folders"
                )
    for name, files in extra.get("val", {}).items():  # Kaggle-style val/ joins the training pool
        key = by_key[name.casefold()]
        train[key] = sorted(train[key] + files, key=lambda p: p.as_posix())
    test = {by_key[n.casefold()]: files for n, files in extra.get("test", {}).items()}
    return train, test


def _chest_xray_layout(cfg: DatasetConfig) -> _Layout:
    root = dataset_root(cfg, CHEST_LAYOUT, "dataset.download is not available for chest_xray.")
    splits = _split_folders(root)
    if splits:
        train, test = _split_classes(splits, cfg)
    else:
        train, test = scan_classes(root, cfg, CHEST_LAYOUT), {}
    names = select_names(list(train), cfg.classes, "class", splits.get("train", root))
    _need_two(names, splits.get("train", root), cfg, CHEST_LAYOUT)
    missing = [n for n in names if test and n not in test]
    if missing:
        log.warning("chest_xray: %s has no test images for class(es) %s", splits["test"], ", ".join(missing))
    groups = [(train[name], {"label": label}, False) for label, name in enumerate(names)]
    groups += [(test.get(name, []), {"label": label}, True) for label, name in enumerate(names)]
    return _Layout(root, {"label": names}, "label", groups)


def load_chest_xray(cfg: DatasetConfig) -> Source:
    """Chest X-ray class folders; a ``test/`` folder becomes ``official_test``."""
    layout = _chest_xray_layout(cfg)
    return _to_source(layout.items(), layout.root, cfg, layout.default_task)


def meta_chest_xray(cfg: DatasetConfig) -> DatasetMeta:
    return _chest_xray_layout(cfg).meta()


def _digit_folders(language: Path) -> None:
    """A language folder must hold exactly the digit folders 0..9."""
    names = {d.name for d in subfolders(language)}
    if names != set(DIGITS):
        unexpected = sorted(names - set(DIGITS))
        missing = sorted(set(DIGITS) - names, key=int)
        parts = ([f"unexpected folder(s) {', '.join(unexpected)}"] if unexpected else []) + (
            [f"missing {', '.join(missing)}"] if missing else [])
        raise TlbenchError(
            f"language folder {language} must contain exactly the digit folders 0..9; "
            f"{' and '.join(parts)}. Expected layout: {DIGITS_LAYOUT}"
        )


def _handwritten_digits_layout(cfg: DatasetConfig) -> _Layout:
    root = dataset_root(cfg, DIGITS_LAYOUT, "dataset.download is not available for handwritten_digits.")
    found = [d.name for d in subfolders(root)]
    if not found:
        raise TlbenchError(f"{root} has no language folders. Expected layout: {DIGITS_LAYOUT}")
    languages = select_names(found, cfg.classes, "language", root)
    layout = _Layout(root, {"digit": list(DIGITS), "language": languages}, "digit")
    for lang_label, language in enumerate(languages):
        _digit_folders(root / language)
        digits = scan_classes(root / language, cfg, DIGITS_LAYOUT)
        layout.groups += [(digits[d], {"digit": int(d), "language": lang_label}, False) for d in DIGITS]
    return layout


def load_handwritten_digits(cfg: DatasetConfig) -> Source:
    """``ROOT/<Language>/<digit>/*`` -> tasks ``digit`` (0-9) and ``language`` (sorted names).

    ``dataset.classes`` selects languages (e.g. ``[Thai]``); both tasks are always labelled.
    """
    layout = _handwritten_digits_layout(cfg)
    return _to_source(layout.items(), layout.root, cfg, layout.default_task)


def meta_handwritten_digits(cfg: DatasetConfig) -> DatasetMeta:
    return _handwritten_digits_layout(cfg).meta()
