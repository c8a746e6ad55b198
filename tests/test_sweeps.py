"""Hydra multirun: one run dir per job; relaunching skips finished jobs and resumes unfinished ones."""

from __future__ import annotations

import json

import tlbench.run as run_mod
from tlbench.cli import main


def _sweep(tmp_path, *extra):
    return main(["-m", "optim.lr=0.01,0.001", "trainer.max_epochs=1", "trainer.progress=false",
                 "trainer.limit_train_batches=4", f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra])


def test_relaunch_skips_finished_and_resumes_unfinished(tmp_path, monkeypatch):
    calls = []
    real = run_mod.train

    def counting(cfg, run_dir, **kw):
        calls.append((cfg.optim.lr, cfg.trainer.resume))
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(run_mod, "train", counting)
    assert _sweep(tmp_path) == 0
    assert [c[0] for c in calls] == [0.01, 0.001]
    sweep = tmp_path / "sweep"
    first = json.loads((sweep / "0" / "results.json").read_text())
    (sweep / "1" / "results.json").unlink()  # job 1 "was interrupted": last.pt but no results
    calls.clear()
    assert _sweep(tmp_path) == 0
    assert calls == [(0.001, "auto")], calls  # job 0 skipped, job 1 resumed
    assert json.loads((sweep / "0" / "results.json").read_text()) == first
    assert (sweep / "1" / "results.json").is_file()
    calls.clear()
    assert _sweep(tmp_path, "sweep.skip_finished=false") == 0
    assert [c[0] for c in calls] == [0.01, 0.001]
