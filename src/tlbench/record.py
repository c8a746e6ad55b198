"""The run record: who owns a run directory, what state it is in, and when it is written.

A run directory belongs to one run. The rules this module enforces:

- **Nothing before the start.** A command refused or failing before training changes nothing
  in an existing run directory; a new directory it leaves behind holds at most
  ``status.json`` saying ``failed``. ``.hydra/`` (the composed config and the overrides),
  ``train.log`` and ``config_hash`` are written by :func:`start`, once the run really starts
  (config checked, directory locked, data and model built). Log lines emitted before that are
  held in memory and written to ``train.log`` at the start.
- **One run at a time.** :class:`RunLock` (``.lock``: pid, host) makes a second run in the same
  directory refuse with exit 2; a lock left by a dead process on this host is taken over.
- **A status for every run.** ``status.json`` (atomic): ``running | finished | interrupted |
  diverged | failed``, the message, the epochs completed and the optimizer steps taken.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .errors import TlbenchError

log = logging.getLogger(__name__)

STATES = ("running", "finished", "interrupted", "diverged", "failed")
LOCK = ".lock"
STATUS = "status.json"


# ----------------------------------------------------------------------------- status
def write_status(run_dir: Path, state: str, message: str = "", epoch: Optional[int] = None,
                 step: Optional[int] = None) -> None:
    assert state in STATES, state
    data = {"state": state, "message": message, "epoch": epoch, "step": step,
            "pid": os.getpid(), "host": socket.gethostname(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(Path(run_dir) / STATUS, json.dumps(data, indent=2) + "\n")


def read_status(run_dir: Path) -> Optional[dict]:
    try:
        data = json.loads((Path(run_dir) / STATUS).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- before the start
STARTUP_FILES = {STATUS, LOCK, ".hydra", "train.log", "config_hash", "splits.json", "tb", "checkpoints"}


def is_fresh(run_dir: Path) -> bool:
    """No run has produced anything worth keeping here: the folder is missing or empty (Hydra
    creates it empty), or it holds only what a start writes before the first checkpoint (e.g. a
    ``failed`` status, or a run killed while starting). Such a folder can be (re)started."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return True
    names = {p.name for p in run_dir.iterdir()}
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return False
    return names <= STARTUP_FILES


def check_writable(path: Path, what: str) -> None:
    """Exit 2 before any work when ``path`` (or the folder that would hold it) can't be written."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise TlbenchError(f"{what} {path} cannot be created: {probe} is a file, not a folder; "
                           f"choose another location (hydra.run.dir=... or hydra.sweep.dir=...)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TlbenchError(f"{what} {path} cannot be written: no write permission in {probe}; "
                           f"choose a writable location (hydra.run.dir=... or hydra.sweep.dir=...)")


class RunLock:
    """``run_dir/.lock`` holds ``pid host``; created with O_EXCL. A lock whose process is gone
    (same host) is stale and taken over; a live one (or one from another host) refuses."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    log.warning("removing a stale lock %s (its process is gone)", self.path)
                    self.path.unlink(missing_ok=True)
                    continue
                raise TlbenchError(self._busy_message()) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return self
        raise TlbenchError(self._busy_message())

    def _owner(self) -> tuple[Optional[int], str]:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None, ""

    def _stale(self) -> bool:
        pid, host = self._owner()
        if pid is None:  # unreadable: a lock being written right now, or garbage
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except OSError:
                return True
        if host != socket.gethostname():
            return False  # can't tell from here
        if pid == os.getpid():
            return True  # our own leftover (e.g. an earlier in-process run that crashed)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _busy_message(self) -> str:
        pid, host = self._owner()
        return (f"{self.path.parent} is in use by another tlbench run (process {pid} on {host or '?'}, "
                f"lock file {self.path}); wait for it, write elsewhere (hydra.run.dir=...), or, if "
                f"that process is gone, delete the lock file and resume with trainer.resume={self.path.parent}")

    def __exit__(self, *exc) -> bool:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False


# ----------------------------------------------------------------------------- the start
class EarlyLog(logging.Handler):
    """Holds the log records emitted before the run starts; :func:`start` writes them to
    ``train.log``, so a refused command leaves no log file behind."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "EarlyLog":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> bool:
        logging.getLogger().removeHandler(self)
        return False

    def flush_into(self, handler: logging.Handler) -> None:
        for r in self.records:
            handler.handle(r)
        self.records.clear()


def open_log(run_dir: Path, name: str = "train.log") -> logging.Handler:
    """Attach ``run_dir/train.log`` to the root logger (once) and return its handler."""
    path = str((Path(run_dir) / name).resolve())
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) == path:
            return h
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def close_log(run_dir: Path, name: str = "train.log") -> None:
    path = str((Path(run_dir) / name).resolve())
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) == path:
            root.removeHandler(h)
            h.close()


def write_hydra_record(run_dir: Path, files: Optional[dict[str, str]]) -> None:
    """``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml`` as the CLI composed them
    (written only when a new run starts: a resumed run keeps its original record)."""
    if not files:
        return
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(folder / name, text)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (``resume``/``progress`` ignored)."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k in ("resume", "progress", "sweep", "hydra"):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({_short(a)} -> {_short(b)})")
    return out


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."
