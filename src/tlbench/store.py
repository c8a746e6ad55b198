"""The feature store: frozen-prefix outputs computed once and shared by every job that needs
the same ones (the jobs of a sweep, a rerun, another seed).

An entry is a folder ``<root>/<key>/`` holding ``features.npy`` (one array, fp16 by default)
and ``meta.json`` (shape, dtype, byte size, sha256 of the array file, and what the key was
made of). The key hashes everything the features depend on: the prefix's weights, the split
point, the input transform (size, normalization), the dataset fingerprint and split indices,
the flip variant and the dtype; the caller builds that dict.

- Creation is atomic: written into a temp folder, then renamed into place. A per-key lock
  (``<key>.lock``, pid + host, O_EXCL) makes a second job wait for the first instead of
  computing the same features again; a lock whose process is gone is taken over.
- A damaged entry (missing file, wrong size, wrong hash, unreadable) is detected on load,
  logged, removed and rebuilt: never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import locks

log = logging.getLogger(__name__)

DEFAULT_ROOT = "~/.cache/tlbench/features"
MMAP_BYTES = int(os.environ.get("TLBENCH_MMAP_BYTES", 4 << 30))  # larger entries are memory-mapped, not loaded


def default_root() -> Path:
    env = os.environ.get("TLBENCH_CACHE")
    return Path(env).expanduser() / "features" if env else Path(DEFAULT_ROOT).expanduser()


def open_store(setting: Optional[str]) -> "FeatureStore":
    """The store a ``trainer.feature_store`` setting names: ``auto`` (:func:`default_root`), a path,
    or null/none (no disk: everything lives in this process only)."""
    if setting is None or str(setting).lower() in ("null", "none"):
        return FeatureStore(None)
    return FeatureStore(default_root() if str(setting).lower() == "auto" else setting)


def as_tensor(a) -> torch.Tensor:
    """A stored array as a tensor without a copy (a read-only memory map stays one: batches are
    sliced from it, never written)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": nothing writes to it
        return torch.from_numpy(np.asarray(a))


def make_key(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def tensor_digest(tensors) -> str:
    """sha256 over the bytes of tensors (e.g. a prefix's parameters and buffers, in order)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureStore:
    """``get_or_create(key, compute, parts)`` -> (array, reused). ``root=None``: no disk, the
    features live only in this process."""

    def __init__(self, root: Optional[Path], wait_s: float = 3600.0):
        self.root = Path(root).expanduser() if root is not None else None
        self.wait_s = wait_s

    # ------------------------------------------------------------------ public
    def get_or_create(self, key: str, compute: Callable[[], np.ndarray], parts: Optional[dict] = None,
                      mmap: "bool | str" = False, fill: Optional[Callable[[Path], None]] = None
                      ) -> tuple[np.ndarray, bool]:
        """The entry ``key`` (reused) or a new one. ``compute()`` returns the array; ``fill(path)``,
        when given, writes the ``.npy`` file itself (batch by batch into a memory map, so outputs
        larger than memory are never held whole). ``mmap``: True, False or ``"auto"`` (memory-map
        files larger than ``MMAP_BYTES``, load smaller ones)."""
        if self.root is None:
            return compute(), False
        self.root.mkdir(parents=True, exist_ok=True)
        found = self._load(key, mmap)
        if found is not None:
            return found, True
        lock = self.root / f"{key}.lock"
        deadline = time.time() + self.wait_s
        while True:
            if self._try_lock(lock):
                try:
                    found = self._load(key, mmap)  # another job finished it meanwhile
                    if found is not None:
                        return found, True
                    if fill is not None:
                        self._write_file(key, fill, parts or {})
                        return self._load(key, mmap), False
                    arr = compute()
                    self._write(key, arr, parts or {})
                    return (self._load(key, mmap) if mmap else arr), False
                finally:
                    lock.unlink(missing_ok=True)
            found = self._load(key, mmap)
            if found is not None:
                return found, True
            if time.time() > deadline:
                log.warning("feature store: gave up waiting for %s; computing without the store", lock)
                return compute(), False
            time.sleep(0.2)

    def entry(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key

    # ------------------------------------------------------------------ internals
    def _try_lock(self, lock: Path) -> bool:
        if locks.try_create(lock):
            return True
        if locks.stale(lock):
            log.warning("feature store: removing a stale lock %s", lock)
            lock.unlink(missing_ok=True)
        return False

    def _write(self, key: str, arr: np.ndarray, parts: dict) -> None:
        self._write_file(key, lambda path: np.save(path, np.ascontiguousarray(arr)), parts)

    def _write_file(self, key: str, fill: Callable[[Path], None], parts: dict) -> None:
        # called with the key's lock held: any other temp folder of this key is a killed writer's, and a
        # partial features file can be as large as the entry (it would keep a full disk full)
        for old in self.root.glob(f".{key}.*.tmp"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        tmp.mkdir(parents=True)
        try:
            fill(tmp / "features.npy")
            arr = np.load(tmp / "features.npy", mmap_mode="r")
            meta = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": (tmp / "features.npy").stat().st_size,
                    "sha256": _file_sha256(tmp / "features.npy"), "parts": parts, "created": time.time()}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            del arr
        except BaseException:  # a full disk, a signal: no half-written entry left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.entry(key)
        if final.exists():  # a damaged one that _load rejected, or a racing writer's
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # someone else's complete entry won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)

    def lookup(self, key: str, mmap: "bool | str" = "auto") -> Optional[np.ndarray]:
        """The entry ``key`` when it is stored and whole (a damaged one is removed), else None."""
        return None if self.root is None else self._load(key, mmap)

    def _load(self, key: str, mmap: bool) -> Optional[np.ndarray]:
        d = self.entry(key)
        if not d.exists():
            return None
        why = None
        try:
            meta = json.loads((d / "meta.json").read_text())
            f = d / "features.npy"
            if mmap == "auto":
                mmap = meta["bytes"] > MMAP_BYTES
            if f.stat().st_size != meta["bytes"]:
                why = f"size {f.stat().st_size} != {meta['bytes']}"
            elif not mmap and _file_sha256(f) != meta["sha256"]:
                why = "sha256 mismatch"
            else:
                arr = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
                if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                    why = "shape/dtype mismatch"
                else:
                    return arr
        except (OSError, ValueError, KeyError) as e:
            why = f"{type(e).__name__}: {e}"
        log.warning("feature store: entry %s is damaged (%s); rebuilding it", d, why)
        shutil.rmtree(d, ignore_errors=True)
        return None
