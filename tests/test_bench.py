"""scripts/bench_gpu.sh cannot rot: its --dry-run composes every GPU case's config and builds its
model (``tlbench plan``), then runs the CNN cases shrunk on CPU, writing under $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_dry_run_writes_its_table_under_out(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable,
           "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run(["bash", str(REPO / "scripts" / "bench_gpu.sh"), "--dry-run", "--only", "cnn 32px"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["case"] for r in rows] == ["cnn 32px tensor", "cnn 32px loader"]
    assert [r["pipeline"] for r in rows] == ["tensor", "loader"] and all(r["train_ips"] > 0 for r in rows)
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| cnn 32px tensor | tensor |" in md and "| cnn 32px loader | loader |" in md
    assert (tmp_path / "out" / "runs" / "cnn_32px_tensor" / "results.json").is_file()
    assert not (tmp_path / "out" / "runs" / "cnn_32px_tensor" / "checkpoints").exists()
    # $OUT comes back from the GPU machine: no synthetic data or feature store in it (tens of GB)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md", "runs"]
