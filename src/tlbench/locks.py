"""Lock files for one writer at a time: ``pid host`` in a file created with ``O_EXCL``.
Used by the run directory (``record.RunLock``) and the feature store (one job computes an
entry, the others wait). A lock is stale when its process is gone (same host), when it is our
own process's leftover, or when it stayed unreadable for a minute; a lock from another host is
never judged stale from here, except one left by an earlier incarnation of this same SLURM job
(a pre-empted or timed-out job requeued, possibly on another node: SLURM runs one incarnation at
a time, so that holder is gone)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional

UNREADABLE_S = 60.0  # a lock file still empty/garbled after this long was never finished


def try_create(path: Path) -> bool:
    """Create the lock file holding this process's pid and host; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()} {slurm_job() or '-'}\n")
    return True


def slurm_job() -> Optional[str]:
    """This process's SLURM job (``ARRAYJOB_TASK`` for an array task), kept across requeues."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _slurm_owner(path: Path) -> Optional[str]:
    try:
        fields = Path(path).read_text().split()
    except OSError:
        return None
    return fields[2] if len(fields) > 2 and fields[2] != "-" else None


def owner(path: Path) -> tuple[Optional[int], str]:
    """``(pid, host)`` written in the lock file, or ``(None, "")`` when it can't be read."""
    try:
        pid, host = Path(path).read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def stale(path: Path) -> bool:
    pid, host = owner(path)
    if pid is None:  # unreadable: a lock being written right now, garbage, or gone
        try:
            return time.time() - Path(path).stat().st_mtime > UNREADABLE_S
        except OSError:
            return True
    mine = slurm_job()
    if mine is not None and _slurm_owner(path) == mine:
        return True  # an earlier incarnation of this requeued SLURM job
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
