"""`pip install .` must carry the Hydra configs: conf/ ships inside the wheel as tlbench/conf."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


def test_wheel_contains_every_config(tmp_path):
    pytest.importorskip("hatchling")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("tlbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO / "conf").rglob("*.yaml"):
        assert f"tlbench/conf/{path.relative_to(REPO / 'conf').as_posix()}" in names, path
    assert "tlbench/cli.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tlbench = tlbench.cli:main_exit" in zipfile.ZipFile(wheel).read(entry).decode()


def test_conf_dir_prefers_the_packaged_copy(tmp_path, monkeypatch):
    import tlbench.compose as compose

    pkg = tmp_path / "tlbench"
    (pkg / "conf").mkdir(parents=True)
    (pkg / "conf" / "config.yaml").write_text("defaults: []\n")
    monkeypatch.setattr(compose, "__file__", str(pkg / "compose.py"))
    assert compose.conf_dir() == pkg / "conf"
