"""One run on several processes (DDP): ``torchrun --nproc_per_node=N -m tlbench ...`` or
``tlbench trainer.devices=N`` (which starts torchrun itself, :func:`launch`).

A single process never initializes anything here: every helper is a no-op when the world has
one process, so the one-process path stays exactly as it was.

The contract (docs/scale.md):
- ``trainer.batch_size`` is the *global* batch; each rank takes ``batch_size / world_size`` of
  every global batch of the seeded per-epoch order (``loaders.EpochSampler``), so N processes
  see the same global batches as one process, and the loss of a step is the mean over that
  global batch (``engine._agree`` scales each rank's loss by its share).
- Validation and test are sharded (rank ``r`` evaluates items ``r, r + N, ...``); sums are
  all-reduced and predictions gathered back into index order, so every rank computes the same
  metrics (and takes the same early-stopping decision) and rank 0 writes them.
- Only rank 0 writes the run directory; every rank reads checkpoints (shared filesystem).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from .errors import TlbenchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def world() -> World:
    return _WORLD


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the torch.distributed variables), or
    one of several tasks of a SLURM job submitted by Hydra's submitit launcher (whose variables
    are then exported the way torchrun sets them)."""
    if (os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1
            and "WORLD_SIZE" not in os.environ):
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> World:
    """Join the process group torchrun described in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): nccl with one GPU per local rank on CUDA, gloo
    on CPU. A process not started by a launcher stays a world of one."""
    global _WORLD
    if not launched():
        return _WORLD
    if not tdist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device not in ("cpu", "mps") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        tdist.init_process_group("nccl" if cuda else "gloo")
        _WORLD = World(tdist.get_rank(), tdist.get_world_size(), local, tdist.get_backend())
        if not _WORLD.main:  # one console: the other ranks only report problems
            logging.getLogger().setLevel(logging.WARNING)
    return _WORLD


def shutdown() -> None:
    global _WORLD
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _WORLD = World()


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` in a CUDA world, else ``device``."""
    if _WORLD.size > 1 and device.type == "cuda":
        return torch.device("cuda", _WORLD.local_rank)
    return device


def check_batch(batch_size: int, size: Optional[int] = None) -> int:
    """The per-rank batch; the global batch must split evenly over the processes."""
    size = size or _WORLD.size
    if batch_size % size:
        raise TlbenchError(
            f"trainer.batch_size={batch_size} is the global batch and must be divisible by the number of "
            f"processes ({size}); use e.g. trainer.batch_size={max(size, batch_size // size * size)}")
    return batch_size // size


# ----------------------------------------------------------------------------- collectives
def all_sum(t: torch.Tensor) -> torch.Tensor:
    if _WORLD.size > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_max(t: torch.Tensor) -> torch.Tensor:
    if _WORLD.size > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them before
    each training forward, but each rank's last forward updates its own copy from its own part of
    the batch: validated as they are, the ranks would score models that differ from the one rank 0
    saves, and the best epoch would be picked on numbers ``best.pt`` does not give."""
    if _WORLD.size > 1:
        for b in module.buffers():
            tdist.broadcast(b, src=0)


def broadcast(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (a no-op for one process)."""
    if _WORLD.size == 1:
        return obj
    box = [obj if _WORLD.main else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list:
    if _WORLD.size == 1:
        return [obj]
    out: list = [None] * _WORLD.size
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _WORLD.size > 1:
        tdist.barrier()


def interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Undo the strided sharding of evaluation: rank ``r`` held items ``r, r + N, ...``."""
    n = sum(len(p) for p in parts)
    out = np.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out


def gather_collected(collected: dict) -> dict:
    """``{task: {name: array}}`` of this rank's shard -> the whole split, in index order, on
    every rank."""
    if _WORLD.size == 1:
        return collected
    parts = all_gather(collected)  # a rank with no item of the split collected no names: the union
    names = {t: list(dict.fromkeys(k for p in parts for k in p.get(t, {}))) for t in collected}
    return {t: {k: interleave([p[t][k] for p in parts if k in p.get(t, {})]) for k in names[t]} for t in collected}


def sync_batchnorm(model: torch.nn.Module, setting: str, device: torch.device) -> bool:
    """``trainer.sync_bn``: in a DDP world, BatchNorm layers normalize over the global batch
    (torch's ``SyncBatchNorm``, parameters and buffers shared, names unchanged), so N processes
    train like one. CUDA only: on CPU, ``auto`` keeps per-process statistics with a warning and
    ``true`` is refused. Returns whether the layers were converted."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if _WORLD.size == 1 or setting == "false" or not has_bn:
        return False
    if device.type != "cuda":
        if setting == "true":
            raise TlbenchError(f"trainer.sync_bn=true needs CUDA devices (torch's SyncBatchNorm), not {device.type}; "
                               "use trainer.sync_bn=auto (each process normalizes over its own part of the batch) "
                               "or a model without BatchNorm")
        log.warning("DDP on %s: each process normalizes BatchNorm over its own part of the global batch "
                    "(SyncBatchNorm needs CUDA), so this run's numbers differ from a 1-process run", device.type)
        return False
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return True


def ddp_wrapper(device: torch.device):
    """The DDP wrapper training runs through, rebuilt when the trainable set changes (gradual
    unfreezing); frozen parameters stay out of its gradient buckets."""
    held: dict = {}

    def wrap(net: torch.nn.Module) -> torch.nn.Module:
        key = (id(net), tuple(p.requires_grad for p in net.parameters()))
        if held.get("key") != key:
            held["key"] = key
            held["ddp"] = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        return held["ddp"]

    return wrap


def describe(device: torch.device) -> dict:
    """results.json's record of the processes that trained the run."""
    return {"world_size": _WORLD.size, "backend": _WORLD.backend, "devices": all_gather(str(device))}


# ----------------------------------------------------------------------------- launching
def launch(nproc: int, overrides: list[str], extra_env: Optional[dict] = None) -> int:
    """``tlbench trainer.devices=N``: run the same command on N local processes through torch's
    own launcher (``python -m torch.distributed.run --standalone``) and return its exit code.
    SIGINT/SIGTERM reach the launcher, which forwards them to every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tlbench", *overrides]
    log.info("starting %d processes: %s", nproc, " ".join(cmd[1:]))
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM,)}
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to the whole group: wait for the ranks to stop
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def launch_run(cfg, task_overrides: list[str], run_dir: Path, sweep_dir: Optional[Path], debug: bool) -> int:
    """``tlbench trainer.devices=N`` outside torchrun: this run on N local processes (:func:`launch`),
    into this run directory (``hydra.run.dir``); a sweep's job tells its ranks its sweep
    (``TLBENCH_SWEEP_DIR``: val only on the console). Returns the launcher's exit code."""
    check_batch(cfg.batch_size, cfg.trainer.devices)
    overrides = [o for o in task_overrides if not o.lstrip("+").startswith("trainer.resume=")]
    if cfg.trainer.resume:
        overrides.append("trainer.resume=auto")
    overrides += [f"hydra.run.dir={run_dir}"] + (["--debug"] if debug else [])
    return launch(cfg.trainer.devices, overrides, {"TLBENCH_SWEEP_DIR": str(sweep_dir)} if sweep_dir else None)


def shared_run_dir(run_dir: Path) -> Path:
    """Every rank composed its own ``hydra.run.dir`` (timestamps may differ by a second): all use
    rank 0's, and a rank's own empty directory is removed."""
    shared = Path(broadcast(str(run_dir)))
    if shared != run_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
    return shared
