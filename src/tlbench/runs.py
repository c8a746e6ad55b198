"""Finding tlbench runs on disk: run directories (recursively, sweeps included) -> :class:`Run`
(config, overrides, results), and :class:`Problem` for every run that did not finish, so a
comparison lists it instead of silently dropping it."""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .errors import TlbenchError


@dataclass
class Run:
    path: Path
    config: dict
    overrides: list
    results: dict


@dataclass
class Problem:
    path: Path
    has_last: bool
    reason: str = ""
    status: Optional[dict] = None  # status.json, when the run wrote one

    def line(self) -> str:
        state = ""
        if self.status:
            state = f"{self.status.get('state')}"
            if self.status.get("epoch") is not None:
                state += f" after epoch {self.status['epoch']}"
            msg = " ".join(str(self.status.get("message") or "").split())
            if self.status.get("state") in ("failed", "diverged") and msg:
                state += f": {msg if len(msg) <= 120 else msg[:117] + '...'}"
            if self.status.get("state") == "running" and _gone(self.status):
                state += f", but its process {self.status['pid']} is gone (killed?): tlbench trainer.resume={self.path}"
            state += "; "
        text = f"not finished: {self.path} ({state}has last.pt: {'yes' if self.has_last else 'no'})"
        return f"{text} - {self.reason}" if self.reason else text


def _gone(status: dict) -> bool:
    """A ``running`` status whose process (on this host) no longer exists: a kill -9, a crash, a reboot."""
    import socket

    pid = status.get("pid")
    if not isinstance(pid, int) or status.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run_dir(d: Path) -> bool:
    return ((d / ".hydra" / "config.yaml").is_file() or (d / "results.json").is_file()
            or (d / "checkpoints").is_dir() or (d / "status.json").is_file())


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories at or under ``root`` (a run dir's own subfolders, e.g. ``eval_*``, are its own)."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        if _is_run_dir(d):
            found.append(d)
            dirnames[:] = []
        else:
            dirnames[:] = sorted((n for n in dirnames if not n.startswith(".")), key=_natural)
    return sorted(found, key=_natural)


def _read_yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _status(d: Path) -> Optional[dict]:
    try:
        data = json.loads((d / "status.json").read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _load_run(d: Path):
    has_last = (d / "checkpoints" / "last.pt").is_file()
    status = _status(d)
    if not (d / "results.json").is_file():
        try:  # name the run by its overrides, if it has them
            return Problem(d, has_last, " ".join(map(str, _read_yaml(d / ".hydra" / "overrides.yaml") or [])),
                           status)
        except Exception:
            return Problem(d, has_last, "", status)
    try:
        results = json.loads((d / "results.json").read_text())
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return Problem(d, has_last, f"results.json unreadable ({e})")
    try:
        config = _read_yaml(d / ".hydra" / "config.yaml")
        overrides = _read_yaml(d / ".hydra" / "overrides.yaml") or []
    except Exception as e:  # yaml errors of any kind
        return Problem(d, has_last, f".hydra/ unreadable ({' '.join(str(e).split())})")
    if not isinstance(config, dict):  # no .hydra: what results.json tells about the config
        config = {k: {"name": results[k]} for k in ("dataset", "model", "freeze") if k in results}
        config["seed"] = results.get("seed")
    return Run(d, config, [str(o) for o in overrides], results)


def _sweep_jobs(sweep_dir: Path) -> list[Problem]:
    """Jobs of a basic-sweeper multirun (``multirun.yaml``) that never got a directory."""
    try:
        conf = _read_yaml(sweep_dir / "multirun.yaml") or {}
    except Exception:
        return []
    hydra = conf.get("hydra") or {}
    sweeper, subdir = hydra.get("sweeper") or {}, (hydra.get("sweep") or {}).get("subdir")
    if "BasicSweeper" not in str(sweeper.get("_target_")) or sweeper.get("params") or subdir != "${hydra.job.num}":
        return []
    axes = []
    for o in (hydra.get("overrides") or {}).get("task") or []:
        key, _, value = str(o).partition("=")
        if re.search(r"[()\[\]{}'\"\\]", value):
            return []  # sweep syntax beyond plain comma lists: don't guess
        axes.append([f"{key}={v}" for v in value.split(",")])
    return [Problem(sweep_dir / str(i), False, f"never started ({' '.join(job)})")
            for i, job in enumerate(itertools.product(*axes)) if not (sweep_dir / str(i)).exists()]


def collect_runs(paths: Iterable) -> tuple[list[Run], list[Problem]]:
    """All run directories under ``paths``: finished runs and the ones that are not."""
    runs, problems, seen = [], [], set()
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            p = p.parent
        if not p.is_dir():
            raise TlbenchError(f"{p} is not a directory; give run directories or sweep directories "
                               f"(folders holding .hydra/config.yaml, results.json, status.json or checkpoints/)")
        dirs = find_run_dirs(p)
        if not dirs:
            raise TlbenchError(f"no run directories under {p}: a run directory holds .hydra/config.yaml, "
                               f"results.json, status.json or checkpoints/")
        for d in dirs:
            if d.resolve() not in seen:
                seen.add(d.resolve())
                item = _load_run(d)
                (runs if isinstance(item, Run) else problems).append(item)
        for sweep in {d.parent for d in dirs if d != p and (d.parent / "multirun.yaml").is_file()}:
            problems.extend(q for q in _sweep_jobs(sweep) if q.path.resolve() not in seen)
    return runs, sorted(problems, key=lambda q: _natural(q.path))


