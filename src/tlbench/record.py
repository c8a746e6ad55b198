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

import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from . import locks
from .checkpoint import fsync_dir, load as load_checkpoint
from .config import Config, config_hash, to_dict
from .errors import TlbenchError
from .validation import to_config

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
    text = json.dumps(data, indent=2) + "\n"
    try:
        atomic_write_text(Path(run_dir) / STATUS, text)
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # a full disk has no room for a second file, but truncating status.json frees what this one needs:
        # a status written in place beats one that says "running" for a run that is over
        with open(Path(run_dir) / STATUS, "w", encoding="utf-8") as f:
            f.write(text)


def read_status(run_dir: Path) -> Optional[dict]:
    try:
        data = json.loads((Path(run_dir) / STATUS).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers (and a kill -9 or a full disk
    at any moment) see the old or the new file, never a part of one; a failed write leaves no temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import ctypes.util
    import errno

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def publish_dir(work: Path, out: Path) -> None:
    """Put the complete folder ``work`` in place of ``out`` (``out`` may exist: it is replaced whole,
    never mixed with ``work``'s files); readers see the old folder or the new one. ``work`` and ``out``
    are in the same folder."""
    import errno
    import shutil

    work, out = Path(work), Path(out)
    try:
        os.rename(work, out)  # out missing (or an empty folder)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _exchange(work, out):  # work now holds the old folder
            shutil.rmtree(work, ignore_errors=True)
        else:  # two renames: between them only the old folder (under a hidden name) exists
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(work, out)
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


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
            if locks.try_create(self.path):
                self.held = True
                return self
            if not locks.stale(self.path):
                break
            log.warning("removing a stale lock %s (its process is gone)", self.path)
            self.path.unlink(missing_ok=True)
        raise TlbenchError(self._busy_message())

    def _busy_message(self) -> str:
        pid, host = locks.owner(self.path)
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
        super().__init__(logging.NOTSET)  # train.log gets every line, DEBUG included
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "EarlyLog":
        full_detail()
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> bool:
        logging.getLogger().removeHandler(self)
        return False

    def flush_into(self, handler: logging.Handler) -> None:
        for r in self.records:
            handler.handle(r)
        self.records.clear()


def full_detail() -> None:
    """tlbench's DEBUG lines are made (train.log keeps them); each console handler's own level
    (``--quiet`` / ``--verbose``) decides what it shows."""
    logger = logging.getLogger("tlbench")
    if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
        logger.setLevel(logging.DEBUG)


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
    full_detail()
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


# ----------------------------------------------------------------------------- what the folder already holds
def _old_config(run_dir: Path) -> Optional[dict]:
    """The typed config a run directory was made with, as a dict (for naming differences)."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        return to_dict(to_config(data))
    except Exception:  # noqa: BLE001 - an old or damaged record: fall back to the checkpoint
        pass
    try:
        return load_checkpoint(run_dir / "checkpoints" / "last.pt").get("config")
    except Exception:  # noqa: BLE001
        return None


def _differs(cfg: Config, run_dir: Path) -> Optional[str]:
    """None when ``run_dir`` was made with ``cfg`` (same config hash), else the keys that differ."""
    path = run_dir / "config_hash"
    saved = path.read_text().strip() if path.is_file() else None
    if saved is None:
        try:
            saved = json.loads((run_dir / "results.json").read_text()).get("config_hash")
        except (OSError, ValueError):
            saved = None
    if saved == config_hash(cfg):
        return None
    old = _old_config(run_dir)
    diff = config_diff(old, to_dict(cfg)) if isinstance(old, dict) else []
    return ", ".join(diff) or "its config hash"


def preflight(cfg: Config, run_dir: Path, fresh: bool) -> Optional[dict]:
    """Checks against what ``run_dir`` already holds, before anything is written. Returns the
    results of a finished run that ``trainer.resume`` points at with the same config."""
    resume = cfg.trainer.resume
    if fresh:
        if resume and resume != "auto":
            if not (run_dir / ".hydra" / "overrides.yaml").is_file():
                raise TlbenchError(f"trainer.resume={resume!r}: {run_dir} holds no run to resume (no checkpoints/last.pt)")
            log.info("%s stopped before its first checkpoint: starting it from the beginning", run_dir)
        return None
    finished, has_last = (run_dir / "results.json").is_file(), (run_dir / "checkpoints" / "last.pt").is_file()
    if not finished and not has_last:
        raise TlbenchError(
            f"{run_dir} is not empty and holds no tlbench run to continue (no results.json, no "
            f"checkpoints/last.pt); nothing was changed there. Write elsewhere (another hydra.run.dir), or "
            f"delete the folder if it is the leftover of a run that never started")
    if not resume:
        raise TlbenchError(
            f"{run_dir} already holds a run ({'results.json' if finished else 'checkpoints/last.pt'}) and nothing "
            f"was overwritten; continue it with trainer.resume={run_dir}, or write elsewhere (another hydra.run.dir)")
    diff = _differs(cfg, run_dir)
    if diff:
        raise TlbenchError(
            f"cannot resume {run_dir}: it was made with a different config (differs in: {diff}); nothing was "
            f"changed there. Resume with the run's own overrides (trainer.resume={run_dir} alone), or start "
            f"a new run elsewhere")
    if finished:
        log.info("%s already finished with this config (results.json exists); nothing to resume", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    return None


def sweep_job(cfg: Config, run_dir: Path, sweep_dir: Path):
    """Relaunching a sweep: a job whose config (full hash) already finished somewhere in
    ``sweep_dir`` is skipped (its results are returned); a job dir holding an unfinished run of
    the same config resumes; a job dir holding a run of another config is refused (exit 2,
    naming the keys that differ): the sweep was changed, so it needs its own hydra.sweep.dir.
    Returns ``(cfg, results or None, the folder that holds the job's results)``: for a skipped
    job the folder it finished in, which need not be Hydra's folder for it (a relaunch may
    number the jobs differently)."""
    want = config_hash(cfg)
    for other in sorted(Path(sweep_dir).rglob("config_hash")):
        done = other.parent / "results.json"
        if other.read_text().strip() == want and done.is_file():
            log.info("skipping: this config (hash %s) already finished in %s", want, other.parent)
            return cfg, json.loads(done.read_text()), other.parent.resolve()
    if is_fresh(run_dir) or cfg.trainer.resume:
        return cfg, None, run_dir
    diff = _differs(cfg, run_dir)
    if diff:
        raise TlbenchError(
            f"{run_dir} holds a job of an earlier sweep with another config (differs in: {diff}); nothing was "
            f"changed there. A changed sweep needs its own folder: add hydra.sweep.dir=NEW_DIR")
    log.info("resuming the unfinished job in %s", run_dir)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume="auto")), None, run_dir


