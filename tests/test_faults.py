"""Faults a user can meet (issue #9): damaged checkpoints, crafted pickles, launchers.

- A. ``last.pt`` / ``best.pt`` truncated, empty or not a checkpoint: ``last.pt`` falls back to
  ``last.prev.pt`` (the copy ``save_atomic`` keeps), else exit 2 naming the file; ``best.pt``
  never falls back silently (an older best is not the run's model). Checkpoints respect the
  umask. ``tlbench eval`` on a run without ``best.pt`` says it needs ``best.pt``.
- B. Files from elsewhere never run code: a crafted CIFAR-10 batch, checkpoint or weights file
  is refused (exit 2 / TlbenchError naming the file) and its payload does not run.
- C. The same config gives the same numbers under the joblib launcher as in a plain run, given
  the same torch thread count (the one difference between them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # fixtures_data / conftest, whatever pytest's import mode

import fixtures_data as fx  # noqa: E402
from conftest import results  # noqa: E402

from tlbench import checkpoint  # noqa: E402
from tlbench.errors import TlbenchError  # noqa: E402

TINY = ("trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.batch_size=64")


class _RunsCode:
    """A pickle payload that, when unpickled without restriction, creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "junk":
        path.write_bytes(b"this is not a checkpoint at all")
    elif how == "crafted":
        torch.save({"model": {}, "epoch": 99, "payload": _RunsCode(path.with_suffix(".ran"))}, path)
    else:  # pragma: no cover
        raise ValueError(how)


def _ckpt(epoch: int) -> dict:
    return {"model": {"w": torch.full((64,), float(epoch))}, "epoch": epoch}


def _cli(*argv: str) -> int:
    from tlbench.cli import main

    try:
        return main(list(argv))
    except SystemExit as e:  # errors raised inside the Hydra task
        return e.code


# ============================================================================ A. checkpoints
def test_save_keeps_the_previous_copy(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic(_ckpt(1), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    checkpoint.save_atomic(_ckpt(2), path)
    checkpoint.save_atomic(_ckpt(3), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.prev.pt", "last.pt"]  # no temp files
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert torch.load(checkpoint.previous_path(path), weights_only=True)["epoch"] == 2


def test_a_full_disk_while_saving_says_so_and_keeps_both_copies(tmp_path, monkeypatch):
    """A write that fails half-way (disk full, ``ulimit -f``: here every write after the first 4 KiB) used
    to end the run with torch's ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``,
    which does not say what happened. Now an OSError naming the errno and the file; last.pt and
    last.prev.pt stay as they were, and no temp file is left."""
    import errno

    path = tmp_path / "last.pt"
    checkpoint.save_atomic(_ckpt(1), path)
    checkpoint.save_atomic(_ckpt(2), path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda *a, **k: Full(real(*a, **k)))
    big = {**_ckpt(3), "w": torch.zeros(100_000)}
    with pytest.raises(OSError, match=r"No space left on device .*last\.pt") as e:
        checkpoint.save_atomic(big, path)
    assert e.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_torn_current_file_is_not_kept_as_the_previous_copy(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(_ckpt(1), path)
    checkpoint.save_atomic(_ckpt(2), path)
    _damage(path, "half")
    checkpoint.save_atomic(_ckpt(3), path)  # the good epoch-1 copy stays the fallback
    assert torch.load(checkpoint.previous_path(path), weights_only=True)["epoch"] == 1
    assert checkpoint.load(path)["epoch"] == 3


def test_a_complete_checkpoint_exists_at_every_rename(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(_ckpt(1), path)
    real, seen = os.replace, []

    def replace(src, dst):
        seen.append(torch.load(path, weights_only=True)["epoch"])  # complete before each rename
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save_atomic(_ckpt(2), path)
    checkpoint.save_atomic(_ckpt(3), path)
    assert seen == [1, 1, 2, 2] and checkpoint.load(path)["epoch"] == 3


def test_without_hard_links_the_moment_between_renames_is_covered(tmp_path, monkeypatch, caplog):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(_ckpt(1), path)

    def no_link(*a, **k):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_link)
    checkpoint.save_atomic(_ckpt(2), path)
    assert checkpoint.load(checkpoint.previous_path(path))["epoch"] == 1
    path.unlink()  # the moment between renaming last.pt away and moving the new one in
    with caplog.at_level(logging.WARNING, logger="tlbench.checkpoint"):
        assert checkpoint.load(path)["epoch"] == 1
    assert "is missing" in caplog.text


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / "last.pt"
        checkpoint.save_atomic(_ckpt(1), path)
        checkpoint.save_atomic(_ckpt(2), path)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert oct(path.stat().st_mode & 0o777) == oct(want)
    assert oct(checkpoint.previous_path(path).stat().st_mode & 0o777) == oct(want)


@pytest.mark.parametrize("how", ["half", "empty", "junk", "crafted"])
def test_damaged_last_falls_back_to_the_previous_copy(tmp_path, how, caplog):
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic(_ckpt(1), path)
    checkpoint.save_atomic(_ckpt(2), path)
    _damage(path, how)
    with caplog.at_level(logging.WARNING, logger="tlbench.checkpoint"):
        ckpt = checkpoint.load(path)
    assert ckpt["epoch"] == 1
    assert str(path) in caplog.text and "last.prev.pt" in caplog.text
    assert not path.with_suffix(".ran").exists()


@pytest.mark.parametrize("how", ["half", "empty", "junk", "crafted"])
def test_damaged_last_without_a_good_copy_names_the_file(tmp_path, how):
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic(_ckpt(1), path)
    _damage(path, how)
    with pytest.raises(TlbenchError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert str(path) in msg and "damaged" in msg and "no good previous copy" in msg
    assert "\n" not in msg and "weights_only` set to `False`" not in msg  # one paragraph, no unsafe advice
    if how == "crafted":
        assert "could run code" in msg and "exec" in msg
        assert not path.with_suffix(".ran").exists()
    checkpoint.save_atomic(_ckpt(1), checkpoint.previous_path(path))
    _damage(checkpoint.previous_path(path), "half")  # both damaged
    with pytest.raises(TlbenchError, match="last.prev.pt is damaged too"):
        checkpoint.load(path)


def test_damaged_best_does_not_fall_back_silently(tmp_path):
    path = tmp_path / "checkpoints" / "best.pt"
    checkpoint.save_atomic(_ckpt(1), path)
    checkpoint.save_atomic(_ckpt(3), path)
    _damage(path, "half")
    with pytest.raises(TlbenchError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert str(path) in msg and "damaged" in msg
    assert "best.prev.pt" in msg and "epoch 1" in msg and "cp " in msg  # the older best, offered knowingly


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 2-epoch CLI run (read-only: tests copy it)."""
    rd = tmp_path_factory.mktemp("finished") / "run"
    assert _cli(*TINY, f"hydra.run.dir={rd}", "trainer.progress=false") == 0
    return rd


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def _metrics(res: dict) -> dict:
    return {"epochs": [(e["train"]["loss"], e["val"]["loss"]) for e in res["epochs"]],
            "val": res["val"], "test": res["test"], "best_epoch": res["best_epoch"]}


def test_resume_with_a_truncated_last_continues_from_the_previous_copy(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = results(run)
    assert torch.load(run / "checkpoints" / "last.prev.pt", weights_only=True)["epoch"] == 1
    (run / "results.json").unlink()  # as if interrupted after the last epoch
    _damage(run / "checkpoints" / "last.pt", "half")
    assert _cli(f"trainer.resume={run}") == 0
    assert _metrics(results(run)) == _metrics(before)  # epoch 2 trained again, same numbers


def test_resume_with_every_copy_damaged_is_exit_2(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    for name in ("last.pt", "last.prev.pt"):
        _damage(run / "checkpoints" / name, "half")
    assert _cli(f"trainer.resume={run}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(run / "checkpoints" / "last.pt") in err and "damaged" in err


@pytest.mark.parametrize("how", ["half", "empty", "crafted"])
def test_eval_with_a_damaged_best_is_exit_2(finished, tmp_path, capsys, how):
    run = _copy(finished, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    _damage(best, how)
    assert _cli("eval", str(run)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(best) in err and "damaged" in err
    assert not best.with_suffix(".ran").exists()
    assert not list(run.glob("eval_*"))


def test_eval_of_a_run_without_best_says_it_needs_best(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    for p in (run / "checkpoints").glob("best*.pt"):
        p.unlink()
    (run / "results.json").unlink()  # interrupted before the end of its first epoch
    assert _cli("eval", str(run)) == 2
    err = capsys.readouterr().err
    assert "checkpoints/best.pt" in err and f"trainer.resume={run}" in err
    assert "a finished or interrupted run has checkpoints/last.pt" not in err


# ============================================================================ B. crafted pickles
def test_the_crafted_payload_is_real(tmp_path):
    """Sanity: unpickled without restriction, the payload does create its marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps({"data": _RunsCode(marker)}, protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("name", ["data_batch_1", "test_batch", "batches.meta"])
def test_crafted_cifar_pickle_is_refused_unrun(cli, tmp_path, capsys, name):
    root = tmp_path / "cifar"
    fx.write_cifar10(root)
    target = root / "cifar-10-batches-py" / name
    marker = tmp_path / "ran"
    with open(target, "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3],
                     "label_names": list(fx.CIFAR_NAMES), "x": _RunsCode(marker)}, f, protocol=2)
    code, run_dir = cli("dataset=cifar10", f"dataset.root={root}", "model=cnn", "trainer=smoke")
    assert code == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the crafted pickle ran code"
    assert "Traceback" not in err and str(target) in err and "exec" in err
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_repickled_by_python3_still_load(tmp_path, protocol):
    """The restricted reader accepts the numpy objects any Python 3 / numpy 2 pickle of a batch uses."""
    from tlbench.config import DatasetConfig
    from tlbench.data import cifar10

    labels = fx.write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # bytes keys, as a Python 3 user would see them
    batch[b"labels"] = np.asarray(batch[b"labels"], dtype=np.int64)  # numpy labels
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    src = cifar10.load(dataclasses.replace(DatasetConfig(), name="cifar10", root=str(tmp_path)))
    np.testing.assert_array_equal(src.labels["label"], labels)
    np.testing.assert_array_equal(src.images[:, 5, 5, 1], np.arange(26))  # the image order
    assert src.tasks == {"label": fx.CIFAR_NAMES}


def test_cifar_loading_never_uses_torchvisions_unpickler(tmp_path, monkeypatch):
    from tlbench.config import DatasetConfig
    from tlbench.data import cifar10

    fx.write_cifar10(tmp_path)

    def unrestricted(*a, **k):
        raise AssertionError("an unrestricted pickle.load was called on a dataset file")

    monkeypatch.setattr(pickle, "load", unrestricted)
    monkeypatch.setattr(pickle, "loads", unrestricted)
    assert len(cifar10.load(dataclasses.replace(DatasetConfig(), name="cifar10", root=str(tmp_path)))) == 26


def test_crafted_weights_and_init_from_files_are_refused(tmp_path):
    from tlbench.models.weights import init_from_state_dict, load_file

    marker = tmp_path / "ran"
    weights = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": _RunsCode(marker)}, weights)
    with pytest.raises(TlbenchError) as e:
        load_file(weights)
    assert str(weights) in str(e.value) and "could run code" in str(e.value)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {"backbone.w": torch.zeros(1)}, "x": _RunsCode(marker)}, run / "checkpoints" / "best.pt")
    with pytest.raises(TlbenchError) as e:
        init_from_state_dict(run)
    assert str(run / "checkpoints" / "best.pt") in str(e.value) and "could run code" in str(e.value)
    assert "weights_only` set to `False`" not in str(e.value)
    assert not marker.exists()


# ============================================================================ C. launchers
def _plugin(name):
    import importlib.util

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install tlbench[sweep])")


@pytest.fixture(scope="module")
def joblib_job(tmp_path_factory):
    """One job of a joblib sweep (loky worker processes, the launcher's default n_jobs=-1) and
    the torch thread count loky gives each worker (OMP_NUM_THREADS = cpu_count // n_jobs)."""
    _plugin("hydra_plugins.hydra_joblib_launcher")
    from joblib import Parallel, delayed

    sweep = tmp_path_factory.mktemp("joblib") / "sweep"
    code = _cli("-m", "hydra/launcher=joblib", "seed=0", *TINY, "trainer.progress=false",
                f"hydra.sweep.dir={sweep}")
    assert code == 0
    threads = Parallel(n_jobs=-1, backend="loky")(delayed(torch.get_num_threads)() for _ in range(2))
    yield results(sweep / "0"), threads[0]
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)  # no idle worker processes left on a shared machine


def test_joblib_job_matches_a_plain_run_with_the_same_threads(joblib_job, cli):
    """The launcher changes nothing but the thread count: same threads -> same numbers (and
    the same config hash: the launcher is not part of the config)."""
    job, worker_threads = joblib_job
    old = torch.get_num_threads()
    torch.set_num_threads(worker_threads)
    try:
        code, rd = cli("seed=0", *TINY)
    finally:
        torch.set_num_threads(old)
    assert code == 0
    plain = results(rd)
    assert plain["config_hash"] == job["config_hash"]
    assert _metrics(plain) == _metrics(job)


def test_results_record_the_torch_thread_count(joblib_job, cli):
    """Two runs of one config hash whose numbers differ (plain: the machine's threads; joblib:
    cpu_count // n_jobs) must say why: results.json records the torch threads used."""
    job, worker_threads = joblib_job
    code, rd = cli("seed=0", *TINY)
    assert code == 0
    plain = results(rd)
    assert job["torch_threads"] == worker_threads
    assert plain["torch_threads"] == torch.get_num_threads()
    if plain["torch_threads"] == job["torch_threads"]:
        assert _metrics(plain) == _metrics(job)


def test_launcher_options_are_accepted(tmp_path):
    """README: ``hydra/launcher=joblib hydra.launcher.n_jobs=2`` runs a sweep in local processes."""
    _plugin("hydra_plugins.hydra_joblib_launcher")
    from tlbench.compose import validate_argv as _validate

    _validate(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"])
