"""Atomic checkpoints (temp file + rename), the previous copy kept, and the RNG state needed
for exact resume.

A checkpoint holds only tensors and plain Python data, so it loads with
``torch.load(..., weights_only=True)``: a file that asks for anything else (a crafted pickle)
is refused unread. ``save_atomic`` keeps the copy it replaces as ``<name>.prev.pt``
(``last.prev.pt``, ``best.prev.pt``): at every instant a complete ``last.pt`` exists, and
when ``last.pt`` cannot be read (truncated, empty, not a checkpoint) ``load`` falls back to
``last.prev.pt`` -- one epoch earlier, which a resumed run simply trains again. ``best.pt``
never falls back silently: ``best.prev.pt`` is an older best, not the model the run selected.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import TlbenchError

log = logging.getLogger(__name__)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: get_rng_state_all() would open a context on every visible
        # GPU (each DDP rank on all of them) and could not be restored on a machine with fewer
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state and torch.cuda.current_device() < len(state["cuda"]):  # checkpoints before Dec 2026
        torch.cuda.set_rng_state(state["cuda"][torch.cuda.current_device()])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- saving
def previous_path(path: Path) -> Path:
    """Where ``save_atomic`` keeps the copy it replaced: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_previous(path: Path) -> None:
    """Make the current ``path`` the previous copy, leaving ``path`` itself in place.

    A hard link is made to a temp name and renamed over ``<name>.prev.pt``, so ``path`` never
    disappears. A current file that is not a complete zip archive (a torn copy) is not kept:
    the older good previous copy stays. Without hard links (some file systems) ``path`` is
    renamed: then for a moment only the previous copy exists, which ``load`` also accepts.
    """
    if not path.is_file() or not zipfile.is_zipfile(path):
        return
    prev = previous_path(path)
    link = path.parent / f".{prev.name}.{uuid.uuid4().hex}.tmp"
    try:
        os.link(path, link)
        os.replace(link, prev)
    except OSError:
        link.unlink(missing_ok=True)
        os.replace(path, prev)


class _Writes:
    """A file for ``torch.save`` that remembers the first write error (a full disk, ``ulimit -f``)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def save_atomic(obj: dict, path: Path, keep_previous: bool = True) -> None:
    """Write ``obj`` to ``path`` so that readers only ever see a complete file; the file it
    replaces becomes ``<name>.prev.pt`` (``keep_previous``). The file gets the permissions the
    user's umask gives new files (not the 0600 of a temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            out = _Writes(f)
            try:
                torch.save(obj, out)
            except RuntimeError as e:  # torch reports a failed write as "unexpected pos": say what failed
                if out.error is None:
                    raise
                raise OSError(out.error.errno, f"{out.error.strerror} (the checkpoint was not written; "
                              f"the file it would replace is kept)", str(path)) from e
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if keep_previous:
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------- loading
class _Unreadable(Exception):
    """A checkpoint file that exists but cannot be used; the message is a short reason."""


def describe_load_error(e: BaseException, path: Optional[Path] = None) -> str:
    """A short, one-line reason why ``torch.load(path, weights_only=True)`` failed.

    A refused payload is described without torch's advice to retry with ``weights_only=False``
    (which would run the file's code)."""
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights only" in msg.lower():
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        what = f" (it asks for {m.group(1)})" if m else ""
        return (f"it holds Python objects other than tensors and plain data{what}; such a file is refused "
                "unread, because loading it could run code")
    try:
        size = Path(path).stat().st_size if path is not None else None
    except OSError:
        size = None
    if size == 0:
        return "the file is empty (0 bytes)"
    if isinstance(e, EOFError) or "central directory" in msg or "PytorchStreamReader" in msg:
        return f"the file is cut short ({size} bytes): it ends before the end of the archive"
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _read(path: Path, map_location) -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - every failure to read is "damaged"
        raise _Unreadable(describe_load_error(e, path)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise _Unreadable(f"it loads, but holds a {type(ckpt).__name__} without the 'model' entry of a "
                          "tlbench checkpoint")
    return ckpt


def _missing(path: Path) -> TlbenchError:
    folder = path.parent
    if path.name == "best.pt":
        if (folder.parent / "results.json").is_file():
            why = (f"{folder.parent} finished (results.json), but its best.pt has been removed since; train the "
                   "run again to evaluate it")
        elif (folder / "last.pt").is_file() or previous_path(folder / "last.pt").is_file():
            why = (f"{folder} has last.pt but no best.pt: the run was interrupted before its first epoch "
                   f"finished. Resume it with trainer.resume={folder.parent}, then evaluate it")
        else:
            why = f"{folder.parent} holds no tlbench checkpoints; give the directory of a tlbench run"
        return TlbenchError(
            f"no checkpoint at {path}: evaluating a run needs checkpoints/best.pt, the best-validation "
            f"checkpoint a run writes after its first complete epoch. {why}")
    if path.name == "last.pt":
        return TlbenchError(f"no checkpoint at {path}; a finished or interrupted run has checkpoints/last.pt")
    return TlbenchError(f"no checkpoint at {path}")


def load(path: Path, map_location="cpu", fallback: Optional[bool] = None) -> dict:
    """The checkpoint at ``path`` (``weights_only=True``); TlbenchError naming the file when it is
    missing, damaged or refused.

    ``fallback``: when ``path`` cannot be read, use ``<name>.prev.pt`` (logged as a warning).
    Default: yes for every file but ``best.pt`` -- its previous copy is an older best, which
    would silently report another model than the one the run selected."""
    path = Path(path)
    prev = previous_path(path)
    if fallback is None:
        fallback = path.name != "best.pt"
    reason = None
    if path.is_file():
        try:
            return _read(path, map_location)
        except _Unreadable as e:
            reason = str(e)
    prev_reason = None
    if prev.is_file():
        try:
            older = _read(prev, map_location) if fallback or reason else None
        except _Unreadable as e:
            prev_reason, older = str(e), None
        if fallback and older is not None:
            log.warning("%s %s; using the previous copy %s (epoch %s) instead%s", path,
                        f"is damaged ({reason})" if reason else "is missing", prev, older.get("epoch"),
                        "; a resumed run trains the epochs after it again" if path.name == "last.pt" else "")
            return older
    if reason is None:
        raise _missing(path)
    head = f"{path} is damaged (truncated or not a checkpoint: {reason})"
    if not fallback and prev.is_file() and prev_reason is None:
        why = (f"that file is an older best (epoch {older.get('epoch')}), not the model this run selected, so its "
               "numbers would not be the run's" if path.name == "best.pt" else
               f"that file is an older copy (epoch {older.get('epoch')})")
        raise TlbenchError(
            f"{head}. It is not replaced by {prev.name} automatically: {why}. To use it knowingly, copy it over: "
            f"cp {prev} {path}; or train the run again")
    gone = f"{prev.name} is damaged too ({prev_reason})" if prev_reason else f"there is no {prev.name}"
    todo = ("; the run cannot be resumed: train it again into a new directory" if path.name == "last.pt"
            else "; train the run again" if path.name == "best.pt" else "")
    raise TlbenchError(f"{head} and there is no good previous copy ({gone}){todo}")
