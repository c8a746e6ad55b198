"""The feature store (issue #12): computed once, shared, atomic, never trusts a damaged entry."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from tlbench.store import FeatureStore, make_key, tensor_digest


def _arr(seed=0):
    return np.random.default_rng(seed).standard_normal((50, 8)).astype(np.float16)


def test_computed_once_then_reused(tmp_path):
    store, calls = FeatureStore(tmp_path), []

    def compute():
        calls.append(1)
        return _arr()

    a, reused_a = store.get_or_create("k", compute, {"what": "test"})
    b, reused_b = store.get_or_create("k", compute)
    assert (reused_a, reused_b) == (False, True) and len(calls) == 1
    assert np.array_equal(a, b) and b.dtype == np.float16
    m, _ = store.get_or_create("k", compute, mmap=True)
    assert isinstance(m, np.memmap) and np.array_equal(np.asarray(m), a)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_meta", "garbage_meta"])
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path, damage):
    store = FeatureStore(tmp_path)
    store.get_or_create("k", _arr)
    f, meta = tmp_path / "k" / "features.npy", tmp_path / "k" / "meta.json"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-10])
    elif damage == "flip_byte":
        b = bytearray(f.read_bytes())
        b[-1] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "drop_meta":
        meta.unlink()
    else:
        meta.write_text("{not json")
    calls = []
    arr, reused = store.get_or_create("k", lambda: calls.append(1) or _arr())
    assert not reused and calls == [1] and np.array_equal(arr, _arr())
    assert store.get_or_create("k", _arr)[1]  # the rebuilt entry is good


def _job(root, out, barrier):
    store = FeatureStore(Path(root))
    barrier.wait()

    def compute():
        with open(out, "a") as f:
            f.write(f"{os.getpid()}\n")
        import time

        time.sleep(0.5)
        return _arr()

    arr, _ = store.get_or_create("shared", compute)
    assert np.array_equal(arr, _arr())


def test_concurrent_jobs_compute_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    out = tmp_path / "computed.txt"
    procs = [ctx.Process(target=_job, args=(str(tmp_path / "store"), str(out), barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(out.read_text().split()) == 1  # one job computed, two reused
    assert not list((tmp_path / "store").glob("*.lock")) and not list((tmp_path / "store").glob(".*.tmp"))


def test_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "k.lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    arr, reused = FeatureStore(tmp_path, wait_s=30).get_or_create("k", _arr)
    assert not reused and np.array_equal(arr, _arr())


def test_keys_and_digests_change_with_their_inputs():
    import torch

    assert make_key({"a": 1, "b": 2}) == make_key({"b": 2, "a": 1}) != make_key({"a": 1, "b": 3})
    w = [torch.ones(3), torch.zeros(2)]
    assert tensor_digest(w) == tensor_digest([t.clone() for t in w])
    w2 = [torch.ones(3), torch.tensor([0.0, 1e-7])]
    assert tensor_digest(w) != tensor_digest(w2)


def test_no_root_means_no_disk(tmp_path):
    arr, reused = FeatureStore(None).get_or_create("k", _arr)
    assert not reused and np.array_equal(arr, _arr())


def test_a_failed_or_killed_write_leaves_no_temp_folder(tmp_path):
    """A write that fails (full disk) removed nothing: its partial temp folder, as large as the entry,
    stayed and kept the disk full; neither was a killed writer's ever removed. Now a failed write
    removes its own, and the next writer (holding the key's lock) removes a killed writer's."""
    store = FeatureStore(tmp_path)

    def no_space(path):
        Path(path).write_bytes(b"\\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.get_or_create("k", _arr, fill=no_space)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    killed = tmp_path / ".k.999999999.tmp"  # a writer killed by kill -9
    killed.mkdir()
    (killed / "features.npy").write_bytes(b"partial")
    a, reused = store.get_or_create("k", _arr)
    assert not reused and np.array_equal(a, _arr())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]
