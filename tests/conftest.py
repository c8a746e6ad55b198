"""Shared fixtures: compose the real config from conf/, shrink it, run the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The small real datasets (../shared/data), or TLBENCH_SHARED_DATA."""
    return Path(os.environ.get("TLBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the feature store of each test is its own (never ~/.cache; no reuse between tests)
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path_factory.mktemp("tlbench_cache")))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    # no test touches the network: the reachability check's connector refuses (a test that
    # needs a reachable host patches tlbench.net._connect itself), and nothing is remembered
    from tlbench import net

    def no_network(host, port, timeout):
        raise OSError(f"tests never connect (to {host}:{port})")

    monkeypatch.setattr(net, "_connect", no_network)
    net.forget()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    _drop_closed_console_handlers()


def _drop_closed_console_handlers() -> None:
    """Hydra's job logging gives the root logger a console handler on the sys.stdout of the moment:
    in a test, pytest's capture of that test, closed when it ends. A later in-process command that
    logs (tlbench eval) would then print '--- Logging error ---' tracebacks. One process per
    command (real use) never sees this; between tests such handlers are dropped."""
    import logging

    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler and getattr(h.stream, "closed", False):
            root.removeHandler(h)


@pytest.fixture
def cli(tmp_path):
    """Run ``tlbench`` in-process into ``tmp_path/run``; returns (exit_code, run_dir)."""
    from tlbench.cli import main

    def run(*overrides: str, run_dir: Path | None = None) -> tuple[int, Path]:
        rd = run_dir or tmp_path / "run"
        args = [*overrides, f"hydra.run.dir={rd}", "trainer.progress=false"]
        try:
            code = main(args)
        except SystemExit as e:  # errors raised inside the Hydra task
            code = e.code
        return code, rd

    return run


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def compose_cfg(*overrides: str):
    from tlbench.compose import compose

    return compose(list(overrides))


class BrokenLogger:
    """An optional logger (it poses as mlflow) whose every call fails: the run must not care."""

    name = "mlflow"

    def __init__(self, *a, **k):
        pass

    def scalars(self, *a):
        raise RuntimeError("store is gone")

    hparams = close = scalars
