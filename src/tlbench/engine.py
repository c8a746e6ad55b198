"""The one loop. ``run_epoch`` serves train, val and test alike; ``fit`` adds epochs,
early stopping on validation, checkpoints and logging.

Models return ``{task: logits}``. What the loop minimizes and scores is an *objective*:
``objectives.Classification`` by default (cross-entropy on logits, summed over tasks);
``LoopOptions.objective`` replaces it (``recon.Reconstruction``: the model's output is
compared with its input).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from . import dist
from .checkpoint import rng_state, set_rng_state
from .errors import TlbenchError
from .metrics import epoch_ece, improved, macro_f1, monitor_value
from .objectives import Classification
from .optim import group_lrs, step_scheduler

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised inside the loop after SIGINT/SIGTERM; ``last.pt`` holds the last full epoch."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class Diverged(TlbenchError):
    """The training loss became NaN/inf, or grew past ``trainer.divergence_factor`` x its first-epoch
    value. ``last.pt`` keeps the last good epoch. (A user-facing error: exit 2.)"""

    def __init__(self, message: str, epoch: Optional[int] = None, step: Optional[int] = None):
        super().__init__(message)
        self.epoch, self.step = epoch, step


def select_device(name: str) -> torch.device:
    """``auto`` = cuda, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TlbenchError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TlbenchError("trainer.device='mps' but MPS is not available here; use trainer.device=auto or cpu")
    return torch.device(name)


def amp_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    if precision == "32":
        return None
    if device.type != "cuda":
        log.warning("trainer.precision=%s needs CUDA; running in 32-bit on %s", precision, device)
        return None
    return torch.float16 if precision == "16-mixed" else torch.bfloat16


@dataclass
class EpochResult:
    loss: float
    task_loss: dict[str, float]
    accuracy: dict[str, float]
    n: int
    seconds: float
    steps: int = 0  # batches seen
    collected: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # task -> targets/preds/probs
    data_wait_s: float = 0.0  # time the host waited for the next batch (the data path stalling the loop)


@dataclass
class LoopOptions:
    device: torch.device
    dtype: Optional[torch.dtype] = None
    grad_clip: Optional[float] = None
    progress: bool = False
    class_weights: Optional[dict[str, torch.Tensor]] = None
    stop_flag: Optional[Callable[[], Optional[int]]] = None  # returns a signal number to stop
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None  # training: (step in epoch, loss on device)
    channels_last: bool = False  # 4-d batches in channels-last memory format (speed.py)
    objective: Optional[object] = None  # None = Classification(class_weights); recon.Reconstruction
    calibration_bins: int = 15  # of each epoch's validation ECE (eval.calibration_bins)


def batch_to(x: torch.Tensor, opts: "LoopOptions") -> torch.Tensor:
    """A batch on the loop's device (and in channels-last layout when asked, for 4-d images)."""
    x = x.to(opts.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if opts.channels_last and x.dim() == 4 else x


def autocast(opts: "LoopOptions"):
    """Mixed-precision context for ``opts`` (a no-op in 32-bit)."""
    return torch.autocast(opts.device.type, dtype=opts.dtype) if opts.dtype else contextlib.nullcontext()


class _Sums:
    """Running sums of an epoch, kept on the device: no host sync per batch. ``value()`` syncs
    once (one ``.tolist()`` of a stacked tensor)."""

    def __init__(self, tasks, device, scored=None):
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.loss, self.task_loss = z(), {t: z() for t in tasks}
        # hits of the tasks the objective scores (classification: every task; reconstruction: none)
        scored = tasks if scored is None else scored
        self.correct = {t: torch.zeros((), dtype=torch.int64, device=device) for t in scored}
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite loss
        self.bad_value = z()

    def add(self, step: int, bs: int, loss, losses: dict, correct: dict, check_finite: bool) -> None:
        loss = loss.detach()
        self.loss += loss.double() * bs
        for t, v in losses.items():
            self.task_loss[t] += v.detach().double() * bs
        for t, c in correct.items():
            self.correct[t] += c
        if check_finite:
            first = (~torch.isfinite(loss)) & (self.bad_step < 0)
            self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
            self.bad_value = torch.where(first, loss.double(), self.bad_value)

    def value(self, n: int) -> tuple[float, dict, dict, int, float, int]:
        """(loss sum, task loss sums, correct counts of the scored tasks, first bad step or -1, its
        loss, items): over every rank of a DDP world (sums all-reduced), else this process's."""
        tasks, scored = list(self.task_loss), list(self.correct)
        k, c = len(tasks), len(scored)
        sums = torch.stack([self.loss, *[self.task_loss[t] for t in tasks], *[self.correct[t].double() for t in scored],
                            torch.tensor(float(n), dtype=torch.float64, device=self.loss.device)])
        local_bad = self.bad_step.double().reshape(1)
        flat = torch.cat([dist.all_sum(sums), dist.all_max(local_bad.clone()), local_bad,
                          self.bad_value.reshape(1)]).tolist()  # the epoch's one sync
        bad, local, value = int(flat[-3]), int(flat[-2]), flat[-1]
        return (flat[0], dict(zip(tasks, flat[1:1 + k])), dict(zip(scored, flat[1 + k:1 + k + c])),
                bad, value if local == bad else float("nan"), int(flat[-4]))


def run_epoch(model, loader, tasks, opts: LoopOptions, optimizer=None, scaler=None,
              limit: Optional[int] = None, desc: str = "", collect: bool = False) -> EpochResult:
    """One pass over ``loader``: trains when ``optimizer`` is given, else evaluates.

    Sums, correct counts and the NaN/inf check stay on the device; the host syncs once at the
    end of the epoch (and for the progress bar at most about once a second). A non-finite
    training loss raises :class:`Diverged` at the end of the epoch, naming its first step; the
    caller never saves that epoch, so ``last.pt`` keeps the last good one."""
    train = optimizer is not None
    start = time.perf_counter()
    world = dist.world().size
    n, steps = 0, 0
    objective = opts.objective or Classification(opts.class_weights)
    store: dict[str, dict[str, list]] = {t: {} for t in tasks}
    sums = _Sums(tasks, opts.device, tasks if objective.scores else ())
    total = min(len(loader), limit) if limit else len(loader)
    waited = [0.0]
    bar = tqdm(_timed(loader, waited), total=total, desc=desc, leave=False, disable=not opts.progress)
    shown = time.monotonic()
    grad = torch.enable_grad() if train else torch.inference_mode()
    with grad, contextlib.closing(bar):
        for i, (x, y) in enumerate(bar):
            if limit is not None and i >= limit:
                break
            if world == 1 and opts.stop_flag and (sig := opts.stop_flag()):
                raise Interrupted(sig)
            x = batch_to(x, opts)
            y = {t: v.to(opts.device, non_blocking=True) for t, v in y.items()}
            bs = x.shape[0]
            scale = _agree(bs, opts) if train and world > 1 else None
            with autocast(opts):
                out = model(x)
                losses = objective.losses(out, x, y)
                loss = sum(losses.values())
            if train:
                _step(loss if scale is None else loss * scale, model, optimizer, scaler, opts.grad_clip)
                if opts.on_step is not None:
                    opts.on_step(i + 1, loss.detach())
            hits, items = objective.measure(out, x, y, collect)
            steps = i + 1
            n += bs
            sums.add(i + 1, bs, loss, losses, hits, train)
            for t, named in (items or {}).items():
                for k, v in named.items():
                    store[t].setdefault(k, []).append(v)
            if opts.progress and time.monotonic() - shown > 1.0:
                shown = time.monotonic()
                bar.set_postfix(loss=f"{sums.loss.item() / max(n, 1):.4f}")
    loss_sum, t_loss, correct, bad_step, bad_value, n = sums.value(n)
    if bad_step >= 0:
        raise Diverged(f"the training loss became {bad_value} at step {bad_step}", step=bad_step)
    n1 = max(n, 1)
    collected = (dist.gather_collected({t: {k: _cat(v) for k, v in s.items()} for t, s in store.items()})
                 if collect else {})
    return EpochResult(
        loss=loss_sum / n1, task_loss={t: v / n1 for t, v in t_loss.items()},
        accuracy={t: c / n1 for t, c in correct.items()}, n=n,
        seconds=time.perf_counter() - start, steps=steps, collected=collected, data_wait_s=waited[0],
    )


def _timed(loader, waited: list):
    """The loader's batches; ``waited[0]`` adds up the time spent getting each one. The loop never
    syncs with the device per step, so on CUDA the host runs ahead of the GPU: time it spends
    here is time the GPU may have had nothing queued (a data-path stall), not kernel time."""
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t
        yield batch


def _cat(parts: list) -> np.ndarray:
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0)


def _agree(bs: int, opts: LoopOptions) -> torch.Tensor:
    """DDP, once per training step: the global batch size and whether any rank was asked to stop
    (all ranks stop at the same step, never one inside a collective). Returns the factor that
    makes DDP's gradient average the gradient of the mean loss over the global batch."""
    stop = opts.stop_flag() if opts.stop_flag else None
    flags = dist.all_sum(torch.tensor([float(bs), float(stop or 0)], device=opts.device))
    if flags[1].item():
        raise Interrupted(int(stop or signal.SIGTERM))
    return bs * dist.world().size / flags[0]


def _step(loss, model, optimizer, scaler, grad_clip) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()


class _Handlers:
    """SIGINT/SIGTERM go to ``self._handle`` inside the ``with`` block; the previous handlers come
    back after it (outside the main thread nothing is installed)."""

    def __init__(self):
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


class SignalGuard(_Handlers):
    """Turn SIGINT/SIGTERM into a flag the loop checks between batches."""

    def __init__(self):
        super().__init__()
        self.signum: Optional[int] = None

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            sys.exit(128 + signum)
        self.signum = signum
        log.warning("signal %d received: stopping after this batch, last.pt keeps the last full epoch", signum)

    def __call__(self) -> Optional[int]:
        return self.signum


class RunSignals(_Handlers):
    """SIGINT/SIGTERM for the whole of a started run. Outside the epochs (the frozen-prefix pass,
    the final evaluation) a signal stops the run at once: ``Interrupted`` is raised where the
    process is, since nothing there needs a step boundary (``last.pt`` is the resume point, and
    ``status.json`` says ``interrupted`` with the resume command, as after a stop in an epoch).
    Without it, SIGINT ended as a failure with a traceback and SIGTERM killed the process with
    ``status.json`` left at ``running``. During the epochs ``fit``'s :class:`SignalGuard` takes
    over (it stops after the batch). From :meth:`finishing` on (results.json is being written)
    a signal is only noted: the run completes and says so."""

    def __init__(self):
        super().__init__()
        self.received: Optional[int] = None
        self._finishing = False

    def _handle(self, signum, frame):
        if self._finishing:
            self.received = signum
            log.warning("signal %d received while the results are written: finishing them first", signum)
            return
        if self.received is not None:  # a second signal while the first unwinds
            sys.exit(128 + signum)
        self.received = signum
        raise Interrupted(signum)

    def finishing(self) -> None:
        self._finishing = True


@dataclass
class TrainState:
    """Everything that changes during training (and goes into a checkpoint)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: Optional[torch.amp.GradScaler]
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (training batches)
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    plan: object = None  # the FreezePlan in force (gradual unfreezing replaces it)
    net: Optional[torch.nn.Module] = None  # what batches run through, when not ``model`` (features.SuffixNet)

    @property
    def runner(self) -> torch.nn.Module:
        """What the batches run through: ``net`` when set, else ``model``. (Never ``net or model``:
        a compiled module's truth value calls ``len()``, which it refuses.)"""
        return self.net if self.net is not None else self.model

    def checkpoint(self, extra: dict) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "step": self.step, "best": self.best, "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs, "history": self.history, "rng": rng_state(), **extra,
        }

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.best, self.best_epoch = ckpt["epoch"], ckpt["best"], ckpt["best_epoch"]
        self.step = ckpt.get("step", 0)
        self.bad_epochs, self.history = ckpt["bad_epochs"], list(ckpt["history"])
        set_rng_state(ckpt["rng"])


@dataclass
class FitHooks:
    """What ``fit`` calls out to: saving, logging, per-epoch plan changes, test stops."""

    save: Callable[[TrainState, str], None]
    log_epoch: Callable[[TrainState, dict], None]
    before_epoch: Optional[Callable[[TrainState, int], None]] = None
    train_mode: Callable[["TrainState"], None] = lambda s: s.model.train()  # frozen BN stays in eval
    stop_after: Optional[int] = None  # tests: behave as if interrupted after this epoch
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda net: net  # DDP: the wrapper that trains


def fit(state: TrainState, loaders: dict, tasks: list[str], opts: LoopOptions, tcfg, hooks: FitHooks) -> TrainState:
    """Train ``tcfg.max_epochs`` epochs (from ``state.epoch``), validating after each;
    keep ``best.pt`` on the monitored validation metric; stop early after
    ``tcfg.patience`` epochs without improvement."""
    with SignalGuard() as guard:
        opts.stop_flag = guard
        while state.epoch < tcfg.max_epochs:
            epoch = state.epoch
            if hooks.before_epoch:
                hooks.before_epoch(state, epoch)
            loaders["train"].sampler.set_epoch(epoch)
            lrs = group_lrs(state.optimizer)
            hooks.train_mode(state)
            try:
                train = run_epoch(hooks.wrap(state.runner), loaders["train"], tasks, opts,
                                  state.optimizer, state.scaler,
                                  tcfg.limit_train_batches, desc=f"epoch {epoch + 1} train")
            except Diverged as e:
                raise _diverged(f"{e} of epoch {epoch + 1}", epoch, state.step + (e.step or 0)) from None
            _check_divergence(state, train, tcfg, epoch)
            state.step += train.steps
            state.model.eval()
            dist.broadcast_buffers(state.model)  # validate the model rank 0 saves
            val = run_epoch(state.runner, loaders["val"], tasks, opts, limit=tcfg.limit_eval_batches,
                            desc=f"epoch {epoch + 1} val", collect=True)
            step_scheduler(state.scheduler, val.loss)
            value = monitor_value(tcfg.monitor, val)
            is_best = improved(tcfg.monitor, value, state.best)
            if is_best:
                state.best, state.best_epoch, state.bad_epochs = value, epoch + 1, 0
            else:
                state.bad_epochs += 1
            state.epoch = epoch + 1
            record = _epoch_record(state.epoch, train, val, lrs, opts.calibration_bins)
            state.history.append(record)
            hooks.log_epoch(state, record)
            if is_best:
                hooks.save(state, "best.pt")
            hooks.save(state, "last.pt")
            if hooks.stop_after is not None and state.epoch >= hooks.stop_after:
                raise Interrupted(signal.SIGTERM)
            if tcfg.patience and state.bad_epochs >= tcfg.patience:
                log.info("early stopping: %s did not improve for %d epochs (best epoch %d)",
                         tcfg.monitor, state.bad_epochs, state.best_epoch)
                break
    return state


def _diverged(what: str, epoch: int, step: int) -> Diverged:
    return Diverged(f"{what} (global step {step}); the run stopped and checkpoints/last.pt keeps epoch {epoch}, "
                    f"the last good one. Lower optim.lr, set trainer.grad_clip, or check the data", epoch, step)


def _check_divergence(state: TrainState, train: EpochResult, tcfg, epoch: int) -> None:
    """A finite blow-up: the epoch's training loss above ``divergence_factor`` x the first epoch's."""
    factor = getattr(tcfg, "divergence_factor", None)
    if not factor or not state.history:
        return
    first = state.history[0]["train"]["loss"]
    if first > 0 and train.loss > factor * first:
        raise _diverged(f"the training loss of epoch {epoch + 1} ({train.loss:.4g}) is more than "
                        f"trainer.divergence_factor={factor:g} times that of epoch 1 ({first:.4g})",
                        epoch, state.step + train.steps)


def _epoch_record(epoch: int, train: EpochResult, val: EpochResult, lrs: dict, bins: int = 15) -> dict:
    return {
        "epoch": epoch,
        "train": {"loss": train.loss, "task_loss": train.task_loss, "accuracy": train.accuracy, "n": train.n,
                  "data_wait_s": train.data_wait_s},
        "val": {"loss": val.loss, "task_loss": val.task_loss, "accuracy": val.accuracy,
                "macro_f1": macro_f1(val.collected), "ece": epoch_ece(val.collected, bins), "n": val.n},
        "lr": lrs, "train_seconds": train.seconds, "val_seconds": val.seconds,
    }
