"""One run on several processes (DDP, gloo on CPU) and cluster sweeps (SLURM via submitit).

The 2-process runs are real: ``torchrun`` (``python -m torch.distributed.run``) starting
``python -m tlbench`` twice. A model without BatchNorm (the MLP) trained on the same global
batches gives the same numbers as one process, up to float summation order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, results
from test_datasets_e2e import check_run_dir

# batch 16: ~80 steps an epoch, slow enough to stop a run after its first epoch; val_fraction
# 0.1536 leaves 1251 training images: the last batch (3) splits 2 + 1, where only the global-mean
# loss (dist: each rank's loss scaled by its share) matches one process
RUN = ["model=mlp", "trainer.max_epochs=5", "trainer.batch_size=16", "dataset.val_fraction=0.1536", "trainer.device=cpu",
       "trainer.progress=false", "trainer.num_threads=1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tlbench"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same experiment on one process and on two (torchrun)."""
    base = tmp_path_factory.mktemp("ddp")
    one, two = base / "one", base / "two"
    out = _run([sys.executable, "-m", "tlbench", *RUN, f"hydra.run.dir={one}"])
    assert out.returncode == 0, out.stderr[-3000:]
    out = _run([*TORCHRUN, *RUN, f"hydra.run.dir={two}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return one, two, out


def test_two_processes_train_like_one(runs):
    one, two, _ = runs
    a, b = results(one), results(two)
    assert b["processes"] == {"world_size": 2, "backend": "gloo", "devices": ["cpu", "cpu"], "sync_bn": False}
    assert a["processes"]["world_size"] == 1
    for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
        assert eb["train"]["n"] == ea["train"]["n"] and eb["val"]["n"] == ea["val"]["n"]
        assert eb["train"]["loss"] == pytest.approx(ea["train"]["loss"], rel=1e-5)
        assert eb["val"]["loss"] == pytest.approx(ea["val"]["loss"], rel=1e-5)
    assert b["test"]["label"]["accuracy"] == a["test"]["label"]["accuracy"]
    assert b["test"]["label"]["loss"] == pytest.approx(a["test"]["label"]["loss"], rel=1e-5)
    assert a["config_hash"] == b["config_hash"]


def test_the_two_process_run_dir_is_complete_and_recomputable(runs):
    one, two, _ = runs
    res, preds = check_run_dir(two, ["label"])  # predictions: the whole test split, in index order
    single = (one / "predictions" / "label.csv").read_text().splitlines()
    double = (two / "predictions" / "label.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in double] == [r.split(",")[:3] for r in single]
    # rank 1 wrote nothing: the two run dirs hold the same files
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "tb" not in p.parts)  # noqa: E731
    assert files(two) == files(one)
    tool = REPO.parent / "shared" / "tools" / "check_run.py"
    if tool.is_file():
        out = _run([sys.executable, str(tool), str(two)])
        assert out.returncode == 0, out.stdout + out.stderr


def test_sigterm_to_the_launcher_then_resume_on_devices_2_matches(runs, tmp_path):
    """SIGTERM to torchrun stops both ranks at the same step (no hang in a collective);
    ``last.pt`` keeps epoch 1; ``tlbench trainer.resume=DIR trainer.devices=2`` (tlbench starts
    torchrun itself) ends with the uninterrupted run's numbers."""
    _, two, _ = runs
    rd = tmp_path / "stopped"
    proc = subprocess.Popen([*TORCHRUN, *RUN, f"hydra.run.dir={rd}"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads((rd / "status.json").read_text()).get("epoch", 0) >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    status = json.loads((rd / "status.json").read_text())
    assert status["state"] == "interrupted" and 1 <= status["epoch"] < 5, status
    assert not (rd / "results.json").exists()
    out = _run([sys.executable, "-m", "tlbench", f"trainer.resume={rd}", "trainer.devices=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = results(two), results(rd)
    assert b["processes"]["world_size"] == 2 and b["epochs_run"] == 5
    assert [e["val"]["loss"] for e in b["epochs"]] == pytest.approx([e["val"]["loss"] for e in a["epochs"]], rel=1e-6)
    assert b["test"]["label"]["loss"] == pytest.approx(a["test"]["label"]["loss"], rel=1e-6)
    assert f"resumed from {rd / 'checkpoints' / 'last.pt'}" in (rd / "train.log").read_text()


def test_global_batch_must_divide(tmp_path):
    rd = tmp_path / "r"
    out = _run([sys.executable, "-m", "tlbench", "model=mlp", "trainer.devices=2", "trainer.batch_size=63",
                f"hydra.run.dir={rd}"])
    assert out.returncode == 2
    assert "trainer.batch_size=63 is the global batch and must be divisible by the number of processes (2)" in out.stderr
    assert not rd.exists() or not any(rd.iterdir())


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n,batch,world", [(37, 8, 2), (40, 8, 4), (33, 12, 3), (9, 4, 2)])
def test_rank_shards_rebuild_the_global_batches(n, batch, world):
    from tlbench.data.loaders import EpochSampler

    one = list(EpochSampler(n, seed=3))
    single = [one[i:i + batch] for i in range(0, n, batch)]
    shards = []
    for r in range(world):
        s = EpochSampler(n, 3, r, world, batch)
        s.set_epoch(0)
        items = list(s)
        assert len(s) == len(items)
        shards.append([items[i:i + batch // world] for i in range(0, len(items), batch // world)])
    steps = {len(b) for b in shards}
    assert len(steps) == 1, "every rank must take the same number of steps"
    for k in range(steps.pop()):
        assert sum((shards[r][k] for r in range(world)), []) == single[k]
    if n % batch and n % batch < world:  # a tail smaller than the world is dropped
        assert len(single) == len(shards[0]) + 1


def test_interleave_undoes_strided_shards():
    from tlbench.data.loaders import Strided
    from tlbench.dist import interleave

    n, world = 11, 3
    parts = [np.array([[i, -i] for i in Strided(n, r, world)]) for r in range(world)]
    assert interleave(parts).tolist() == [[i, -i] for i in range(n)]


# ----------------------------------------------------------------------------- SLURM
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
         "hydra.launcher.tasks_per_node=4", "hydra.launcher.timeout_min=90", "hydra.job.name=tlbench"]


def test_slurm_launcher_builds_the_requested_job(tmp_path, monkeypatch):
    """The config composes and the submitit executor it builds (inspected without a cluster:
    a stand-in ``srun`` on PATH, submission intercepted) carries the requested resources."""
    import submitit
    from hydra.utils import instantiate

    from tlbench.compose import hydra_compose as _hydra_compose

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    cfg = _hydra_compose([*SLURM, f"hydra.sweep.dir={tmp_path / 'sweep'}"], hydra_cfg=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    seen = {}

    class Submitted(Exception):
        pass

    def map_array(executor, fn, *args):
        seen.update(executor=executor, fn=fn, args=args)
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    with pytest.raises(Submitted):
        launcher.launch([["optim.lr=0.1"], ["optim.lr=0.2"]], 0)
    ex = seen["executor"]._executor
    assert ex.max_num_timeout == 20
    script = ex._make_submission_file_text("CMD", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=90", "--signal=USR2@120",
                 "--cpus-per-task=8", "--mem=64GB"):
        assert f"#SBATCH {line}" in script, line
    assert seen["args"][0] == (["optim.lr=0.1"], ["optim.lr=0.2"])
    # on pre-emption/time-out submitit requeues launcher.checkpoint(...): the same job, same args
    delayed = launcher.checkpoint(["optim.lr=0.1"], "hydra.sweep.dir", 0, "id", {})
    assert delayed.function is launcher and delayed.args[0] == ["optim.lr=0.1"]


def test_a_requeued_sweep_job_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """Simulated pre-emption: a sweep job dies after epoch 1 leaving its lock (written on another
    node by the same SLURM job); the requeued job (the same sweep job run again, what submitit's
    checkpoint does) takes the lock over, resumes at epoch 1 and ends like an uninterrupted job."""
    import tlbench.run as run
    from tlbench.cli import main

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    sweep = tmp_path / "sweep"
    args = ["-m", "model=mlp", "trainer.max_epochs=3", "trainer.progress=false", "trainer.num_threads=1",
            "seed=7", f"hydra.sweep.dir={sweep}"]
    orig = run.train
    monkeypatch.setattr(run, "train", lambda cfg, rd, stop_after=None, **kw: orig(cfg, rd, stop_after=1, **kw))
    with pytest.raises(SystemExit):
        main(args)
    job = sweep / "0"
    assert json.loads((job / "status.json").read_text())["epoch"] == 1
    (job / ".lock").write_text("999999 another-node 4242\n")  # the killed incarnation's lock
    monkeypatch.setattr(run, "train", orig)
    assert main(args) == 0
    log = (job / "train.log").read_text()
    assert "resuming the unfinished job" in log or "resumed from" in log
    assert f"resumed from {job / 'checkpoints' / 'last.pt'} at epoch 1" in log
    ref = tmp_path / "ref"
    assert main(["model=mlp", "trainer.max_epochs=3", "trainer.progress=false", "trainer.num_threads=1", "seed=7",
                 f"hydra.run.dir={ref}"]) == 0
    assert results(job)["test"]["label"]["loss"] == pytest.approx(results(ref)["test"]["label"]["loss"], rel=1e-6)


def test_a_lock_of_another_slurm_job_on_another_node_is_kept(tmp_path, monkeypatch):
    from tlbench.locks import stale

    lock = tmp_path / ".lock"
    lock.write_text("999999 another-node 4242\n")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert not stale(lock)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert stale(lock)


def test_slurm_tasks_become_torch_distributed_ranks(monkeypatch):
    """Several tasks of one submitit SLURM job: tlbench exports the variables torchrun would set."""
    from tlbench import dist

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        assert dist.launched()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
        assert os.environ["MASTER_ADDR"] == "gpu01"
    finally:
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)
    assert not torch.distributed.is_initialized()


def _bn_model():
    from tlbench.config import ModelConfig
    from tlbench.models import build_backbone

    return build_backbone(ModelConfig(name="cnn", channels=(8, 16), batch_norm=True, image_size=16))


@pytest.mark.parametrize("setting, device, world, converted", [
    ("auto", "cuda", 2, True), ("true", "cuda", 2, True), ("false", "cuda", 2, False),
    ("auto", "cuda", 1, False), ("auto", "cpu", 2, False)])
def test_sync_bn_converts_batchnorm_only_where_it_can_and_is_wanted(monkeypatch, caplog, setting, device, world,
                                                                     converted):
    """trainer.sync_bn: SyncBatchNorm in a DDP world on CUDA (parameters, buffers and names kept,
    so the optimizer and checkpoints are unchanged); on CPU, auto warns that each process
    normalizes over its own part of the batch. (The conversion does not touch the device.)"""
    from tlbench import dist

    monkeypatch.setattr(dist, "_WORLD", dist.World(rank=0, size=world, backend="gloo"))
    net = _bn_model()
    params, names = {n: id(p) for n, p in net.named_parameters()}, list(net.state_dict())
    assert dist.sync_batchnorm(net, setting, torch.device(device)) is converted
    kinds = {type(m).__name__ for m in net.modules()}
    assert ("SyncBatchNorm" in kinds) is converted and ("BatchNorm2d" in kinds) is not converted
    assert {n: id(p) for n, p in net.named_parameters()} == params and list(net.state_dict()) == names
    assert ("normalizes BatchNorm over its own part" in caplog.text) is (device == "cpu")


def test_sync_bn_true_on_cpu_is_refused(monkeypatch):
    from tlbench import dist
    from tlbench.errors import TlbenchError

    monkeypatch.setattr(dist, "_WORLD", dist.World(rank=0, size=2, backend="gloo"))
    with pytest.raises(TlbenchError, match=r"trainer.sync_bn=true needs CUDA devices .*trainer.sync_bn=auto"):
        dist.sync_batchnorm(_bn_model(), "true", torch.device("cpu"))


def test_the_frozen_prefix_pass_is_split_across_ranks(tmp_path):
    """With the prefix cache (a frozen cnn: its BatchNorm in eval), each of 2 ranks computes the
    prefix over its half of every split (rank 0's log says how many), the halves are gathered
    into index order, and training on them gives the 1-process numbers; a second 2-process run
    reads the entries rank 0 stored."""
    run = ["model=cnn", "freeze=linear_probe", "trainer.max_epochs=2", "trainer.batch_size=32", "trainer.device=cpu",
           "trainer.progress=false", "trainer.num_threads=1", "trainer.cache_features=true"]
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    out = _run([sys.executable, "-m", "tlbench", *run, f"trainer.feature_store={tmp_path / 's1'}",
                f"hydra.run.dir={one}"])
    assert out.returncode == 0, out.stderr[-3000:]
    for d in (two, again):
        out = _run([*TORCHRUN, *run, f"trainer.feature_store={tmp_path / 's2'}", f"hydra.run.dir={d}"])
        assert out.returncode == 0, out.stderr[-3000:]
    a, b, c = results(one), results(two), results(again)
    assert b["feature_cache"]["shards"] == 2 and b["feature_cache"]["reused"] is False
    assert c["feature_cache"]["reused"] is True and a["feature_cache"]["shards"] == 1
    n_train = a["epochs"][0]["train"]["n"]
    log = (two / "train.log").read_text()
    assert f"computing the outputs of {(n_train + 1) // 2} images" in log
    assert f"computing the outputs of {n_train} images" in (one / "train.log").read_text()
    for r in (b, c):
        assert [e["train"]["loss"] for e in r["epochs"]] == pytest.approx([e["train"]["loss"] for e in a["epochs"]],
                                                                          rel=1e-5)
        assert r["test"]["label"]["accuracy"] == a["test"]["label"]["accuracy"]


def test_the_best_epoch_is_chosen_on_the_model_rank_0_saves(tmp_path):
    """BatchNorm on 2 CPU processes (no SyncBatchNorm): each rank's last training forward updates
    its own running statistics. Validation runs on rank 0's (the saved model's), so the best
    epoch's logged validation numbers are the ones best.pt gives in the final evaluation."""
    rd = tmp_path / "bn"
    out = _run([*TORCHRUN, "model=cnn", "trainer.max_epochs=2", "trainer.batch_size=32", "trainer.device=cpu",
                "trainer.progress=false", "trainer.num_threads=1", f"hydra.run.dir={rd}"])
    assert out.returncode == 0, out.stderr[-3000:]
    r = results(rd)
    best = r["epochs"][r["best_epoch"] - 1]["val"]
    assert best["accuracy"]["label"] == r["val"]["label"]["accuracy"]
    assert best["loss"] == pytest.approx(r["val"]["label"]["loss"], rel=1e-5)
