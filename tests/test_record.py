"""The run record is sacred (issue #9): a refused or failing command never changes a run
directory, one directory holds one run, every run has a status, divergence is recorded, and
overrides that would run code are refused."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_cfg, results

SHORT = ("trainer.max_epochs=2", "trainer.batch_size=128")


def tree(root: Path) -> dict:
    """path -> sha256 of every file under ``root`` (what 'nothing changed' compares)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main(args: list) -> int:
    """``tlbench`` in-process; errors inside the Hydra task exit via SystemExit."""
    from tlbench.cli import main as cli_main

    try:
        return cli_main(list(args))
    except SystemExit as e:
        return e.code


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    rd = tmp_path_factory.mktemp("finished") / "run"
    assert main([*SHORT, f"hydra.run.dir={rd}", "trainer.progress=false"]) == 0
    return rd


@pytest.fixture
def interrupted(tmp_path):
    """A run stopped after epoch 1 of 2, with the CLI's .hydra record."""
    rd = tmp_path / "intr"
    import tlbench.run as run

    orig = run.train

    def stop_after_1(cfg, run_dir, stop_after=None, **kw):
        return orig(cfg, run_dir, stop_after=1, **kw)

    run.train = stop_after_1
    try:
        assert main([*SHORT, f"hydra.run.dir={rd}", "trainer.progress=false"]) == 128 + signal.SIGTERM
    finally:
        run.train = orig
    assert status(rd)["state"] == "interrupted" and status(rd)["epoch"] == 1
    return rd


# ----------------------------------------------------------------------------- 1. refused commands change nothing
@pytest.mark.parametrize("extra", [("optim.lr=0.05",), ()])
def test_refused_run_into_finished_dir_changes_nothing(cli, finished, extra):
    before = tree(finished)
    code, _ = cli(*SHORT, *extra, run_dir=finished)
    assert code == 2
    assert tree(finished) == before


def test_compare_labels_survive_a_refused_command(cli, finished, capsys):
    cli(*SHORT, "optim.lr=0.05", run_dir=finished)
    capsys.readouterr()
    assert main(["compare", str(finished), "--by", "optim.lr", "--format", "csv"]) == 0
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["lr"] for r in rows] == ["0.001"]  # the run's own lr, not the refused command's 0.05


def test_refused_commands_keep_an_interrupted_run_resumable(cli, interrupted, capsys):
    before = tree(interrupted)
    code, _ = cli(*SHORT, "optim.lr=0.05", run_dir=interrupted)  # not a resume: refused
    assert code == 2
    assert main([f"trainer.resume={interrupted}", "optim.lr=0.1"]) == 2  # another config: refused
    err = capsys.readouterr().err
    assert "optim.lr (0.001 -> 0.1)" in err
    assert tree(interrupted) == before
    assert main([f"trainer.resume={interrupted}"]) == 0  # still resumable with its own overrides
    assert status(interrupted)["state"] == "finished" and results(interrupted)["epochs_run"] == 2


def test_resume_of_a_finished_run_with_another_config_is_refused(finished, capsys):
    before = tree(finished)
    assert main([f"trainer.resume={finished}", "optim.lr=0.1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert tree(finished) == before


def test_a_resume_that_fails_in_the_build_changes_nothing(interrupted, monkeypatch, capsys):
    """An error found after the checks, while the run is built under the lock (here: the data are
    gone since the interruption), refuses the resume of an existing run without touching it:
    status.json stays `interrupted` (never `failed`), no log line, no .hydra/ rewrite; the run is
    still resumable. Only a new run directory gets a `failed` status.json."""
    import tlbench.run as run_mod
    from tlbench.errors import TlbenchError

    def gone(cfg):
        raise TlbenchError("dataset.root: /data/moved does not exist")

    before = tree(interrupted)
    with monkeypatch.context() as mp:
        mp.setattr(run_mod, "build_everything", gone)
        assert main([f"trainer.resume={interrupted}"]) == 2
    assert "/data/moved does not exist" in capsys.readouterr().err
    assert tree(interrupted) == before
    assert status(interrupted)["state"] == "interrupted"
    assert main([f"trainer.resume={interrupted}"]) == 0


# ----------------------------------------------------------------------------- 2. no debris
@pytest.mark.parametrize("bad", [
    ("dataset=image_folder", "dataset.root=/nonexistent/folder"),
    ("model=timm", "model.arch=no_such_arch_xyz"),
    ("freeze=pattern", "freeze.train=[no_such_block*]"),
])
def test_errors_after_startup_leave_only_a_failed_status(cli, tmp_path, bad):
    code, rd = cli(*bad, run_dir=tmp_path / "new")
    assert code == 2
    leftover = sorted(p.name for p in rd.iterdir()) if rd.exists() else []
    assert leftover in ([], ["status.json"])
    if leftover:
        s = status(rd)
        assert s["state"] == "failed" and s["message"] and s["epoch"] is None


def test_a_failed_start_can_be_retried_in_the_same_dir(cli, tmp_path):
    code, rd = cli("dataset=image_folder", "dataset.root=/nonexistent/folder", run_dir=tmp_path / "new")
    assert code == 2 and status(rd)["state"] == "failed"
    code, rd = cli(*SHORT, run_dir=rd)
    assert code == 0 and status(rd)["state"] == "finished"


def test_compare_flags_a_run_that_never_started(cli, tmp_path, finished, capsys):
    cli("dataset=image_folder", "dataset.root=/nonexistent/folder", run_dir=tmp_path / "new")
    capsys.readouterr()
    assert main(["compare", str(finished), str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "not finished" in out and "failed" in out and "/nonexistent/folder" in out


def test_non_run_folder_is_refused_untouched(cli, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    before = tree(folder)
    code, _ = cli(*SHORT, run_dir=folder)
    assert code == 2 and tree(folder) == before


# ----------------------------------------------------------------------------- 3. one run dir, one run
def test_live_lock_refuses_a_second_run(cli, tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rd = tmp_path / "busy"
        rd.mkdir()
        (rd / ".lock").write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        before = tree(rd)
        code, _ = cli(*SHORT, run_dir=rd)
        assert code == 2
        assert "in use by another tlbench run" in capsys.readouterr().err
        assert tree(rd) == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from tlbench.engine import Interrupted
    from tlbench.run import train

    cfg = compose_cfg(*SHORT, "trainer.progress=false")
    rd = tmp_path / "r"
    with pytest.raises(Interrupted):
        train(cfg, rd, stop_after=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (rd / ".lock").write_text(f"{dead.pid} {os.uname().nodename}\n")  # as if killed -9
    import dataclasses

    res = train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume=str(rd))), rd)
    assert res["epochs_run"] == 2 and not (rd / ".lock").exists()


def test_two_concurrent_runs_in_one_dir(tmp_path):
    """Two real processes into the same directory: one trains, the other refuses (exit 2)."""
    rd = tmp_path / "same"
    cmd = [sys.executable, "-m", "tlbench", f"hydra.run.dir={rd}", "trainer.max_epochs=3", "trainer.progress=false",
           "trainer.num_threads=1"]
    a = subprocess.Popen([*cmd, "optim.lr=0.001"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen([*cmd, "optim.lr=0.002"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    codes = sorted((a.returncode, b.returncode))
    assert codes == [0, 2], outs
    winner_lr = "0.001" if a.returncode == 0 else "0.002"
    overrides = (rd / ".hydra" / "overrides.yaml").read_text()
    assert f"optim.lr={winner_lr}" in overrides
    ckpt = torch.load(rd / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["optim"]["lr"] == float(winner_lr)
    assert results(rd)["config_hash"] == (rd / "config_hash").read_text().strip() == ckpt["config_hash"]


# ----------------------------------------------------------------------------- 4. stale results on relaunch
def test_relaunched_sweep_with_another_config_is_refused(tmp_path, capsys):
    sweep = tmp_path / "S"
    base = ["-m", "seed=0,1", f"hydra.sweep.dir={sweep}", "trainer.max_epochs=1", "trainer.progress=false"]
    assert main(base) == 0
    before = tree(sweep)
    assert main([*base, "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr (0.001 -> 0.01)" in err and "hydra.sweep.dir" in err
    changed = {k for k in set(before) | set(tree(sweep)) if before.get(k) != tree(sweep).get(k)}
    assert changed <= {"multirun.yaml"}  # Hydra's own record of the latest launch
    assert main(base) == 0  # the same sweep relaunched: every job skipped
    assert tree(sweep).keys() == before.keys()


# ----------------------------------------------------------------------------- 5. status for every run
def test_status_of_a_finished_run(finished):
    s = status(finished)
    assert s["state"] == "finished" and s["epoch"] == 2
    assert s["step"] == sum(-(-e["train"]["n"] // 128) for e in results(finished)["epochs"])


def test_status_is_written_atomically(tmp_path, monkeypatch):
    """status.json is replaced whole (temp file + rename): a write torn mid-way (the process killed
    while writing) leaves the previous status readable, never a truncated file."""
    from tlbench.record import read_status, write_status

    import builtins

    import tlbench.record as record

    write_status(tmp_path, "running", "epoch 1 of 2 saved", 1, 5)
    real = Path.write_text

    def torn(self, data, *a, **k):
        real(self, data[: len(data) // 2], *a, **k)
        raise KeyboardInterrupt  # killed mid-write

    class TornFile:  # open(..., "w") whose write stops half-way (however record.py writes the file)
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def __getattr__(self, name):
            return getattr(self.f, name)

    def torn_open(file, mode="r", *a, **k):
        f = builtins.open(file, mode, *a, **k)
        return TornFile(f) if "w" in mode else f

    with monkeypatch.context() as mp:
        mp.setattr(Path, "write_text", torn)
        mp.setattr(record, "open", torn_open, raising=False)
        with pytest.raises(KeyboardInterrupt):
            write_status(tmp_path, "finished", "", 2, 10)
    s = read_status(tmp_path)
    assert s is not None and s["state"] == "running" and s["epoch"] == 1
    write_status(tmp_path, "finished", "", 2, 10)
    assert read_status(tmp_path)["state"] == "finished"


# ----------------------------------------------------------------------------- 7. impossible output paths
def test_run_dir_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([f"hydra.run.dir={tmp_path / 'afile' / 'run'}"]) == 2
    assert str(tmp_path / "afile") in capsys.readouterr().err
    assert main(["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'afile' / 'sweep'}"]) == 2


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_parent_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main([f"hydra.run.dir={ro / 'run'}"]) == 2
        assert "permission" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- 8. divergence
def test_nan_loss_is_recorded_as_diverged(cli, tmp_path, monkeypatch, capsys):
    import tlbench.objectives as objectives

    calls = {"n": 0}
    orig = objectives.task_loss

    def nan_in_epoch_2(logits, target, weight):
        loss = orig(logits, target, weight)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 13:  # 10 batches of 128 per epoch: epoch 2, step 3
                return loss * float("nan")
        return loss

    monkeypatch.setattr(objectives, "task_loss", nan_in_epoch_2)
    code, rd = cli("trainer.max_epochs=3", "trainer.batch_size=128", run_dir=tmp_path / "nan")
    assert code == 2
    err = capsys.readouterr().err
    assert "nan" in err and "epoch 2" in err and "step 3" in err
    s = status(rd)
    assert s["state"] == "diverged" and s["epoch"] == 1 and "epoch 2" in s["message"]
    assert torch.load(rd / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert "diverged" in (rd / "train.log").read_text() or "nan" in (rd / "train.log").read_text()
    assert not (rd / "results.json").exists()


def test_finite_blow_up_is_recorded_as_diverged(cli, tmp_path, monkeypatch, capsys):
    import tlbench.engine as engine

    orig = engine.run_epoch
    epochs = {"n": 0}

    def blow_up(model, loader, tasks, opts, optimizer=None, *a, **k):
        r = orig(model, loader, tasks, opts, optimizer, *a, **k)
        if optimizer is not None:
            epochs["n"] += 1
            if epochs["n"] == 2:
                r.loss = r.loss * 1e4  # finite, but far above epoch 1
        return r

    monkeypatch.setattr(engine, "run_epoch", blow_up)
    code, rd = cli("trainer.max_epochs=3", "trainer.batch_size=128", run_dir=tmp_path / "boom")
    assert code == 2
    assert "divergence_factor" in capsys.readouterr().err
    assert status(rd)["state"] == "diverged"
    monkeypatch.setattr(engine, "run_epoch", orig)
    epochs["n"] = 0
    monkeypatch.setattr(engine, "run_epoch", blow_up)
    code, rd = cli("trainer.max_epochs=3", "trainer.batch_size=128", "trainer.divergence_factor=null",
                   run_dir=tmp_path / "off")
    assert code == 0  # the check can be turned off


def test_a_slow_blow_up_is_measured_against_epoch_1(cli, tmp_path, monkeypatch, capsys):
    """The factor compares with epoch 1's loss, not the previous epoch's: losses 1, 30, 900 under
    divergence_factor=100 never grow 100x in one epoch, but epoch 3's is 900x epoch 1's."""
    import tlbench.engine as engine

    orig, losses = engine.run_epoch, iter([1.0, 30.0, 900.0])

    def creeping(model, loader, tasks, opts, optimizer=None, *a, **k):
        r = orig(model, loader, tasks, opts, optimizer, *a, **k)
        if optimizer is not None:
            r.loss = next(losses)
        return r

    monkeypatch.setattr(engine, "run_epoch", creeping)
    code, rd = cli("trainer.max_epochs=3", "trainer.batch_size=128", "trainer.divergence_factor=100",
                   run_dir=tmp_path / "creep")
    assert code == 2
    assert "training loss of epoch 3" in capsys.readouterr().err
    assert status(rd)["state"] == "diverged"


# ----------------------------------------------------------------------------- 12. no code from overrides
@pytest.mark.parametrize("override", ["+hydra.callbacks.x._target_=builtins.print",
                                      "hydra.sweeper._target_=os.system",
                                      "+model.x._target_=os.system"])
def test_code_running_overrides_are_refused(tmp_path, capsys, override):
    assert main([override, f"hydra.run.dir={tmp_path / 'r'}"]) == 2
    assert "--allow-code" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_replayed_overrides_with_code_are_refused(interrupted, capsys):
    saved = interrupted / ".hydra" / "overrides.yaml"
    saved.write_text(saved.read_text() + "- +hydra.callbacks.evil._target_=os.system\n")
    before = tree(interrupted)
    assert main([f"trainer.resume={interrupted}"]) == 2
    assert "_target_" in capsys.readouterr().err
    assert tree(interrupted) == before


# ----------------------------------------------------------------------------- 9. bad sweep syntax
def test_bad_sweep_syntax_is_exit_2(tmp_path, capsys):
    assert main(["-m", "seed=0,,1", f"hydra.sweep.dir={tmp_path / 's'}"]) == 2
    assert "seed=0,,1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- kill -9 at a random moment
def test_kill_9_at_a_random_moment_then_resume_is_exact(tmp_path):
    """A real process killed with SIGKILL at a random time (seeded, printed), resumed: the
    results equal an uninterrupted run's. (Trials at many moments are in docs/reliability.md.)"""
    rng = random.Random(int(os.environ.get("TLBENCH_KILL_SEED", time.time_ns() % 1000)))
    args = ["trainer.max_epochs=4", "trainer.batch_size=64", "trainer.progress=false", "trainer.num_threads=1",
            "model.dropout=0.2", "dataset.augment=flip"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    ref, run = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "tlbench", *args, f"hydra.run.dir={ref}"], check=True, env=env,
                   capture_output=True)
    busy = results(ref)["time"]["total_s"]  # training + the final evaluation, without start-up
    p = subprocess.Popen([sys.executable, "-m", "tlbench", *args, f"hydra.run.dir={run}"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    delay = rng.uniform(0.0, 0.9) * busy
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    subprocess.run([sys.executable, "-m", "tlbench", f"trainer.resume={run}"], check=True, env=env,
                   capture_output=True)
    a, b = results(ref), results(run)
    assert [e["val"] for e in a["epochs"]] == [e["val"] for e in b["epochs"]], f"delay {delay:.2f}s"
    assert a["test"] == b["test"] and status(run)["state"] == "finished"


# ----------------------------------------------------------------------------- signals outside the epochs
@pytest.mark.parametrize("where,sig", [("test", signal.SIGTERM), ("test", signal.SIGINT),
                                       ("prefix", signal.SIGINT), ("results", signal.SIGTERM)])
def test_a_signal_outside_the_epochs_is_recorded_and_resumable(tmp_path, monkeypatch, capsys, where, sig):
    """SIGINT/SIGTERM in the frozen-prefix pass or the final evaluation: the run stops with
    status 'interrupted' and the resume command, exit 128 + signal (SIGTERM had killed the process
    with status.json left at 'running'; SIGINT had ended as 'failed' with a traceback), and the
    resume ends at the uninterrupted run's numbers. While results.json is written a signal
    waits: the run finishes (exit 0, status 'finished')."""
    import tlbench.features as features
    import tlbench.run as run

    args = [*SHORT, "model=cnn", "freeze=last_block", "trainer.progress=false", "trainer.feature_store=null"]
    assert main([*args, f"hydra.run.dir={tmp_path / 'whole'}"]) == 0
    rd, fired = tmp_path / "run", []

    def fire():
        if not fired:
            fired.append(1)
            os.kill(os.getpid(), sig)

    if where == "prefix":
        real = features._prefix_pass
        monkeypatch.setattr(features, "_prefix_pass", lambda *a, **k: fire() or real(*a, **k))
    elif where == "test":
        real = run.evaluate_split
        monkeypatch.setattr(run, "evaluate_split", lambda net, loader, *a, **k: (
            fire() if loader is loaders_seen[-1] else None) or real(net, loader, *a, **k))
        loaders_seen = []
        real_make = run.make_loaders
        monkeypatch.setattr(run, "make_loaders", lambda *a, **k: loaders_seen.append(
            (out := real_make(*a, **k))["test"]) or out)
    else:
        real_write = run.write_json
        monkeypatch.setattr(run, "write_json", lambda path, obj: (
            fire() if path.name == "results.json" else None) or real_write(path, obj))
    code = main([*args, f"hydra.run.dir={rd}"])
    if where == "results":
        assert code == 0 and status(rd)["state"] == "finished" and fired
        assert "nothing is lost" in (rd / "train.log").read_text()
        return
    assert code == 128 + sig and fired
    st = status(rd)
    assert st["state"] == "interrupted" and f"trainer.resume={rd}" in st["message"], st
    assert "Traceback" not in capsys.readouterr().err
    assert not (rd / "results.json").exists()
    monkeypatch.undo()
    assert main([f"trainer.resume={rd}"]) == 0 and status(rd)["state"] == "finished"
    a, b = results(rd), results(tmp_path / "whole")
    assert a["test"] == b["test"] and a["val"] == b["val"]


def test_a_full_disk_at_the_end_is_a_failed_status_and_resumes_exact(finished, tmp_path, monkeypatch, capsys):
    """The disk fills up during the final evaluation (a tmpfs of 1.4 MB by hand): no new file can be
    created, so status.json could not be replaced and stayed ``running``, and TensorBoard's failed
    flush turned into ``AttributeError: 'NoneType' object has no attribute 'close'`` over the real
    error. Now: status ``failed`` naming the full disk (written in place when no temp file fits), the
    checkpoints intact, and a resume once there is room gives the uninterrupted numbers."""
    import errno

    import tlbench.evaluate as evaluate
    import tlbench.record as record
    from torch.utils.tensorboard import SummaryWriter

    full = {"on": False}

    def no_space(*a, **k):
        full["on"] = True
        raise OSError(errno.ENOSPC, "No space left on device")

    real_atomic, real_flush = record.atomic_write_text, SummaryWriter.flush
    monkeypatch.setattr(evaluate, "write_report", no_space)
    monkeypatch.setattr(record, "atomic_write_text",
                        lambda *a: no_space() if full["on"] else real_atomic(*a))
    monkeypatch.setattr(SummaryWriter, "flush", lambda self: no_space() if full["on"] else real_flush(self))
    rd = tmp_path / "full"
    assert main([*SHORT, f"hydra.run.dir={rd}", "trainer.progress=false"]) not in (0, None)
    err = capsys.readouterr().err
    assert "OSError: [Errno 28] No space left on device" in err and "AttributeError" not in err
    s = status(rd)
    assert s["state"] == "failed" and "No space left on device" in s["message"] and s["epoch"] == 2
    assert torch.load(rd / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert not (rd / "results.json").exists()
    monkeypatch.undo()
    assert main([f"trainer.resume={rd}", "trainer.progress=false"]) == 0
    assert status(rd)["state"] == "finished"
    assert results(rd)["test"] == results(finished)["test"]


def test_results_json_is_written_durably_or_not_at_all(tmp_path, monkeypatch):
    """results.json / metrics.csv were renamed into place without an fsync (after a power cut the new
    name can point at an empty file) and a failed write left ``results.json.tmp`` behind. Now the temp
    file is fsynced before the rename; a write that fails keeps the old file and leaves no temp file."""
    import errno

    import tlbench.record as record
    from tlbench.tracking import write_json

    path = tmp_path / "results.json"
    write_json(path, {"test": 1})
    synced = []
    monkeypatch.setattr(record.os, "fsync", lambda fd: synced.append(fd))
    write_json(path, {"test": 2})
    assert synced and json.loads(path.read_text()) == {"test": 2}

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record.os, "fsync", no_space)
    with pytest.raises(OSError):
        write_json(path, {"test": 3})
    assert json.loads(path.read_text()) == {"test": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_resume_whose_every_checkpoint_copy_is_damaged_changes_nothing(interrupted, capsys):
    """last.pt and last.prev.pt both damaged: the resume is refused while the run is built, before
    it starts (exit 2, naming the file), so the run directory is byte-for-byte unchanged and
    status.json still says 'interrupted' (it became 'failed' at epoch 0, with new log lines)."""
    for name in ("last.pt", "last.prev.pt"):
        p = interrupted / "checkpoints" / name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    before = tree(interrupted)
    assert main([f"trainer.resume={interrupted}"]) == 2
    err = capsys.readouterr().err
    assert str(interrupted / "checkpoints" / "last.pt") in err and "Traceback" not in err
    assert tree(interrupted) == before and status(interrupted)["state"] == "interrupted"
