"""Helpers shared by the dataset loaders: locating ``dataset.root`` and naming classes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..config import DatasetConfig
from ..errors import TlbenchError, choices


def dataset_root(cfg: DatasetConfig, layout: str, hint: str = "", must_exist: bool = True) -> Path:
    """``dataset.root`` as an absolute path; TlbenchError when unset, missing or a file.

    ``layout`` is the expected tree (one line, ``ROOT/...``), ``hint`` an extra sentence
    (e.g. how to download) appended to the error messages.
    """
    tail = f" Expected layout: {layout}." + (f" {hint}" if hint else "")
    if cfg.root is None or str(cfg.root).strip() == "":
        raise TlbenchError(
            f"dataset.root is not set for dataset {cfg.name!r}; set dataset.root=PATH to the "
            f"folder that holds the dataset.{tail}"
        )
    root = Path(os.path.abspath(os.path.expanduser(str(cfg.root))))
    if not must_exist:
        return root
    if not root.exists():
        raise TlbenchError(
            f"dataset.root={cfg.root!r} does not exist (looked at {root}); point dataset.root "
            f"at the folder that holds the {cfg.name} files.{tail}"
        )
    if not root.is_dir():
        raise TlbenchError(f"dataset.root={cfg.root!r} is a file, not a folder (looked at {root}).{tail}")
    return root


def select_names(found: Sequence[str], wanted: Optional[Iterable[str]], what: str, where: Path) -> list[str]:
    """The names of ``found`` picked by ``wanted`` (case-insensitive), in ``found`` order.

    ``wanted=None`` keeps all. A wanted name that is not found raises TlbenchError listing
    those that exist. Names are reported as spelled on disk.
    """
    if not wanted:
        return list(found)
    by_key = {name.casefold(): name for name in found}
    missing = [w for w in wanted if str(w).casefold() not in by_key]
    if missing:
        raise TlbenchError(
            f"dataset.classes lists {choices(missing)}, but no such {what} folder exists under "
            f"{where}; the {what} folders there are: {choices(found)} (matching ignores case)"
        )
    keys = {str(w).casefold() for w in wanted}
    return [name for name in found if name.casefold() in keys]
