"""Wiring: Config -> data, model, freeze plan, optimizer -> ``fit`` -> one test pass -> run dir.

``train(cfg, run_dir)`` is what the CLI calls (and what tests and notebooks can call
without Hydra). The test split is evaluated exactly once, on the best-validation
checkpoint, after training.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __version__, dist, progress
from . import speed as speeds
from .build import build_everything, progress_enabled, seed_everything, versions
from .checkpoint import load as load_checkpoint
from .checkpoint import save_atomic
from .config import Config, config_hash, to_dict
from .data.loaders import make_loaders
from .engine import Diverged, FitHooks, Interrupted, LoopOptions, RunSignals, TrainState, fit, select_device
from .errors import TlbenchError
from .evaluate import evaluate_split, report_split
from .features import backbone_frozen, cache_features, decide
from .freeze import gradual_unfreeze, set_bn_eval
from .optim import build_optimizer, build_scheduler, fill_momentum
from .recon import extend_hooks, objective
from .record import (EarlyLog, RunLock, check_writable, close_log, config_diff, is_fresh, open_log, preflight,
                     write_hydra_record, write_status)
from .loggers import check_available, hparams, open_tracker
from .tracking import Tracker, write_epochs_csv, write_json
from .transfer import results_fields

log = logging.getLogger(__name__)


def _new_state(cfg: Config, model, plan, speed: speeds.Speed) -> TrainState:
    optimizer = build_optimizer(plan.groups, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.trainer.max_epochs)
    scaler = torch.amp.GradScaler("cuda") if speed.grad_scaler else None  # float16 only, never bf16
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, plan=plan)


def _hooks(cfg: Config, run_dir: Path, tracker: Tracker, stop_after, tasks) -> FitHooks:
    extra = {"config": to_dict(cfg), "config_hash": config_hash(cfg), "tasks": tasks}

    def save(state: TrainState, name: str) -> None:
        save_atomic(state.checkpoint(extra), run_dir / "checkpoints" / name)
        if name == "last.pt":
            write_status(run_dir, "running", f"epoch {state.epoch} of {cfg.trainer.max_epochs} saved",
                         state.epoch, state.step)

    def log_epoch(state: TrainState, rec: dict) -> None:
        scalars = {"loss/train": rec["train"]["loss"], "loss/val": rec["val"]["loss"],
                   "time/epoch_train_s": rec["train_seconds"], "time/epoch_val_s": rec["val_seconds"]}
        for split in ("train", "val"):
            for t, acc in rec[split]["accuracy"].items():
                scalars[f"accuracy/{split}/{t}"] = acc
                if len(rec[split]["accuracy"]) > 1:
                    scalars[f"loss/{split}/{t}"] = rec[split]["task_loss"][t]
        scalars.update({f"macro_f1/val/{t}": f for t, f in rec["val"].get("macro_f1", {}).items()})
        scalars.update({f"ece/val/{t}": e for t, e in rec["val"].get("ece", {}).items()})
        scalars.update({f"lr/{g}": lr for g, lr in rec["lr"].items()})
        tracker.scalars(scalars, rec["epoch"])
        if "csv" in cfg.logger:
            write_epochs_csv(run_dir / "metrics.csv", state.history)
        accs = " ".join(f"{t}={a:.4f}" for t, a in rec["val"]["accuracy"].items())
        accs = f" val_acc[{accs}]" if accs else ""  # a reconstruction scores no accuracy
        left = progress.eta(state.history, cfg.trainer.max_epochs)
        log.info("epoch %d/%d train_loss=%.4f val_loss=%.4f%s (%.1fs+%.1fs)%s%s",
                 rec["epoch"], cfg.trainer.max_epochs, rec["train"]["loss"], rec["val"]["loss"], accs,
                 rec["train_seconds"], rec["val_seconds"], " *best*" if state.best_epoch == rec["epoch"] else "",
                 f" eta {left}" if left else "")

    def train_mode(state: TrainState) -> None:
        state.model.train()
        set_bn_eval(state.model, state.plan)
        if backbone_frozen(state.model):  # a frozen feature extractor runs as in inference (no dropout)
            state.model.backbone.eval()
            if cfg.freeze.bn == "train":  # ... except its BatchNorm, which updates its statistics as asked
                for m in state.model.backbone.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.train()

    return FitHooks(save=save, log_epoch=log_epoch, before_epoch=_gradual_hook(cfg),
                    train_mode=train_mode, stop_after=stop_after)


def _gradual_hook(cfg: Config):
    if not cfg.freeze.gradual:
        return None

    def before_epoch(state: TrainState, epoch: int) -> None:
        new = gradual_unfreeze(state.model, cfg.freeze, cfg.optim, epoch)
        if new is None:
            return
        state.plan = new
        # new optimizer groups; parameters that trained already keep their optimizer state
        old = state.optimizer
        state.optimizer = build_optimizer(new.groups, cfg.optim)
        for p, s in old.state.items():
            state.optimizer.state[p] = s
        fill_momentum(state.optimizer)  # fused SGD cannot mix parameters with and without a buffer
        state.scheduler = build_scheduler(state.optimizer, cfg.sched, cfg.trainer.max_epochs)
        if state.scheduler is not None and not isinstance(
                state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            import warnings

            with warnings.catch_warnings():  # fast-forward the schedule to this epoch
                warnings.simplefilter("ignore")
                for _ in range(epoch):
                    state.scheduler.step()

    return before_epoch


def _load_resume_point(cfg: Config, run_dir: Path) -> dict:
    """``last.pt`` of the run being resumed (or ``last.prev.pt`` when it is damaged), read while the
    run is built, before it starts: every copy damaged, or another config, is refused with the run
    directory unchanged (``status.json`` still says ``interrupted``)."""
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    if ckpt.get("config_hash") != config_hash(cfg):
        diff = config_diff(ckpt.get("config") or {}, to_dict(cfg))
        raise TlbenchError(
            f"cannot resume {run_dir}: its checkpoint was made with a different config "
            f"(differs in: {', '.join(diff) or 'its config hash'}); resume with the same overrides as the original run"
        )
    return ckpt


def _resume(cfg: Config, run_dir: Path, state: TrainState, ckpt: dict) -> None:
    hook = _gradual_hook(cfg)
    if hook:  # the optimizer groups as they were when the checkpoint was written
        hook(state, max(0, ckpt["epoch"] - 1))
    state.restore(ckpt)
    log.info("resumed from %s at epoch %d", run_dir / "checkpoints" / "last.pt", state.epoch)


def train(cfg: Config, run_dir: Path, stop_after: Optional[int] = None,
          record: Optional[dict[str, str]] = None, sweeping: bool = False) -> dict:
    """Run one experiment into ``run_dir`` and return the results dict. ``record``: the
    ``.hydra/`` files (name -> text) to write when the run starts (the CLI passes them).
    ``sweeping``: a job of a sweep: its test metrics go to results.json and predictions only,
    never to TensorBoard, where a search could be steered by them.

    Nothing is written before the run starts (config checked, directory locked, data and model
    built): a refused run leaves an existing directory unchanged, a new one with at most
    ``status.json`` saying ``failed``."""
    run_dir = Path(run_dir)
    if not dist.world().main:
        return _follow(cfg, run_dir, stop_after, sweeping)
    told = []  # DDP: the other ranks wait for rank 0's verdict before building anything

    def tell(verdict: str, arg=None) -> None:
        if not told:
            told.append(dist.broadcast((verdict, arg)))

    early = EarlyLog().__enter__()
    try:
        check_writable(run_dir, "the run directory")
        fresh = is_fresh(run_dir)
        done = preflight(cfg, run_dir, fresh)
        if done is not None:
            tell("done")
            return done
        with RunLock(run_dir):
            try:
                ctx = _setup(cfg, run_dir, stop_after)
                ctx.sweeping = sweeping
            except TlbenchError as e:
                if is_fresh(run_dir):
                    write_status(run_dir, "failed", str(e))
                raise
            tell("go", ctx.resuming)
            early.__exit__()
            early.flush_into(open_log(run_dir))
            return _run(cfg, run_dir, ctx, record)
    except BaseException as e:
        tell("stop", str(e))
        raise
    finally:
        early.__exit__()
        close_log(run_dir)
        progress.configure(config=True)  # trainer.progress is this run's: the next command decides anew


def _follow(cfg: Config, run_dir: Path, stop_after: Optional[int], sweeping: bool) -> Optional[dict]:
    """A DDP rank other than 0: train and evaluate in step with rank 0, writing nothing.
    Returns None (rank 0 holds the results)."""
    verdict, arg = dist.broadcast()
    if verdict == "done":
        return None
    if verdict == "stop":
        raise TlbenchError(f"rank 0 stopped the run: {arg}")
    ctx = _setup(cfg, run_dir, stop_after)
    ctx.resuming, ctx.sweeping = arg, sweeping
    if ctx.resuming and ctx.resume_point is None:
        ctx.resume_point = _load_resume_point(cfg, run_dir)
    _train(cfg, run_dir, ctx)
    return None


@dataclass
class _Ctx:
    """One run's working parts: built by ``_setup`` (before anything is written), completed by
    ``_train`` (tracker, loaders, options, the feature pass), read by ``finish``."""

    bundle: object
    state: TrainState
    device: torch.device
    resuming: bool
    stop_after: Optional[int]
    t0: float
    tracker: Optional[Tracker] = None
    loaders: Optional[dict] = None
    opts: Optional[LoopOptions] = None
    feature_cache: Optional[dict] = None  # results.json's record of the frozen-prefix cache
    sweeping: bool = False  # a sweep's job: no test metric reaches TensorBoard
    decision: object = None  # features.CacheDecision
    speed: Optional[speeds.Speed] = None  # the CUDA switches in force (speed.py)
    sync_bn: bool = False  # DDP: BatchNorm layers converted to SyncBatchNorm (dist.sync_batchnorm)
    signals: Optional[RunSignals] = None  # rank 0's signal handling while the run is started
    resume_point: Optional[dict] = None  # last.pt of a resumed run, read while building (_load_resume_point)


def _setup(cfg: Config, run_dir: Path, stop_after: Optional[int]) -> _Ctx:
    t0 = time.perf_counter()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    elif os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() < (os.cpu_count() or 1):
        log.info("torch uses %d CPU thread(s) (OMP_NUM_THREADS=%s, set e.g. by torchrun or the joblib launcher); a plain run "
                 "here uses more and its numbers differ in the last digits: set trainer.num_threads to compare "
                 "runs exactly", torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])
    check_available(cfg.logger)  # an optional logger that is not installed: refused before anything is written
    progress.configure(config=cfg.trainer.progress and dist.world().main)  # bars: rank 0 only
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    bundle, model, plan = build_everything(cfg)
    device = dist.rank_device(select_device(cfg.trainer.device))
    model.to(device)
    sync_bn = dist.sync_batchnorm(model, cfg.trainer.sync_bn, device)  # before anything holds its modules
    speed = speeds.decide(cfg, device, model)
    speeds.apply(speed, model)
    state = _new_state(cfg, model, plan, speed)
    resuming = bool(cfg.trainer.resume) and (run_dir / "checkpoints" / "last.pt").is_file()
    ctx = _Ctx(bundle, state, device, resuming, stop_after, t0, speed=speed, sync_bn=sync_bn,
               resume_point=_load_resume_point(cfg, run_dir) if resuming else None)
    log.debug("config (hash %s): %s", config_hash(cfg), to_dict(cfg))
    log.debug("class counts per split: %s; %d torch threads", bundle.class_counts, torch.get_num_threads())
    ctx.decision = decide(cfg, model, plan)  # trainer.cache_features=true that cannot apply: refused here
    return ctx


def _run(cfg: Config, run_dir: Path, ctx: _Ctx, record: Optional[dict[str, str]]) -> dict:
    """The run has started: write its record, train, evaluate; keep ``status.json`` true."""
    state = ctx.state
    if not ctx.resuming:
        write_hydra_record(run_dir, record)
    write_status(run_dir, "running", "resumed" if ctx.resuming else "started", state.epoch, state.step)
    try:
        with RunSignals() as ctx.signals:
            results = _train(cfg, run_dir, ctx)
    except Interrupted as e:
        write_status(run_dir, "interrupted", f"{e}; resume with: tlbench trainer.resume={run_dir}",
                     state.epoch, state.step)
        raise
    except SystemExit as e:  # a second signal, or submitit exiting after requeuing a pre-empted job
        write_status(run_dir, "interrupted", f"the process was told to exit ({e.code}); "
                     f"resume with: tlbench trainer.resume={run_dir}", state.epoch, state.step)
        raise
    except Diverged as e:
        log.error("%s", e)
        write_status(run_dir, "diverged", str(e), state.epoch, state.step)
        raise
    except BaseException as e:
        log.error("the run failed: %s", e, exc_info=not isinstance(e, TlbenchError))
        write_status(run_dir, "failed", f"{type(e).__name__}: {e}" if not isinstance(e, TlbenchError) else str(e),
                     state.epoch, state.step)
        raise
    finally:
        if ctx.tracker is not None:
            ctx.tracker.close()
    write_status(run_dir, "finished", "", state.epoch, state.step)
    if ctx.signals.received is not None:
        log.warning("signal %d arrived while the results were written; the run finished and nothing is lost",
                    ctx.signals.received)
    return results


def _train(cfg: Config, run_dir: Path, ctx: _Ctx) -> Optional[dict]:
    state, bundle, main = ctx.state, ctx.bundle, dist.world().main
    if main:
        _write_run_files(cfg, run_dir, bundle)
    ctx.tracker = open_tracker(cfg, run_dir, ctx.sweeping) if main else Tracker(run_dir, enabled=False)
    hooks = _hooks(cfg, run_dir, ctx.tracker, ctx.stop_after, bundle.tasks)
    if ctx.resuming:
        _resume(cfg, run_dir, state, ctx.resume_point)
    elif main:
        hooks.save(state, "last.pt")  # an interrupted first epoch still leaves a resumable start
        _log_batch_grid(bundle, ctx.tracker)
    if cfg.trainer.limit_eval_batches:
        log.warning("trainer.limit_eval_batches=%d: validation and the final test score only the first %d items of each "
                    "split (a smoke setting); results.json eval_limit says how many", cfg.trainer.limit_eval_batches,
                    cfg.trainer.limit_eval_batches * cfg.batch_size)
    log.info("model: %d parameters, %d trainable; device %s%s", state.plan.total, state.plan.trainable_count,
             ctx.device, f" x {dist.world().size} processes" if dist.world().size > 1 else "")
    ctx.opts = LoopOptions(device=ctx.device, dtype=ctx.speed.dtype, channels_last=ctx.speed.channels_last,
                           grad_clip=cfg.trainer.grad_clip, progress=progress_enabled(cfg) and main,
                           class_weights=_class_weights(bundle, ctx.device),
                           on_step=_step_logger(cfg, state, ctx.tracker) if main else None,
                           objective=objective(cfg, state.model.backbone.input_spec),
                           calibration_bins=cfg.eval.calibration_bins)
    hooks = extend_hooks(hooks, ctx.opts.objective, state.model, bundle.val, ctx.tracker)
    decision = ctx.decision
    if decision.applied:
        cached, state.net, ctx.feature_cache = cache_features(cfg, bundle, state.model, ctx.opts, decision)
        ctx.loaders = make_loaders(cached, cfg, ctx.device)
    else:
        log.info("frozen-prefix cache not applied: %s", decision.reason)
        ctx.feature_cache = {"applied": False, "reason": decision.reason}
        ctx.loaders = make_loaders(bundle, cfg, ctx.device)
    if ctx.speed.compile:
        state.net, ctx.speed = speeds.compiled(state.runner, ctx.speed)
    if not main:
        hooks = FitHooks(save=lambda s, name: None, log_epoch=lambda s, rec: None, before_epoch=hooks.before_epoch,
                         train_mode=hooks.train_mode)
    if dist.world().size > 1:
        hooks.wrap = dist.ddp_wrapper(ctx.device)
    with progress.EpochBar(cfg.trainer.max_epochs, state.epoch, show=ctx.opts.progress) as bar:
        fit(state, ctx.loaders, list(bundle.tasks), ctx.opts, cfg.trainer, bar.hooked(hooks))
    return finish(cfg, run_dir, ctx)


def _step_logger(cfg: Config, state: TrainState, tracker: Tracker):
    """TensorBoard ``loss/train_step`` every ``trainer.log_every_n_steps`` global steps (the only
    per-step host sync, and only on those steps)."""
    every = cfg.trainer.log_every_n_steps
    if not every:
        return None

    def on_step(step_in_epoch: int, loss: torch.Tensor) -> None:
        step = state.step + step_in_epoch
        if step % every == 0:
            tracker.scalars({"loss/train_step": float(loss)}, step)

    return on_step


def _class_weights(bundle, device):
    if not bundle.class_weights:
        return None
    log.info("dataset.class_weights: every epoch's loss (train, val and a monitored val/loss) is the class-weighted "
             "cross-entropy the run minimizes; results.json val/test loss is the unweighted log-loss of the "
             "predictions (recomputable from predictions/)")
    return {t: torch.tensor(w, dtype=torch.float32, device=device) for t, w in bundle.class_weights.items()}


def _write_run_files(cfg: Config, run_dir: Path, bundle) -> None:
    (run_dir / "config_hash").write_text(config_hash(cfg) + "\n")
    write_json(run_dir / "splits.json", {
        "split_seed": cfg.dataset.split_seed, "dataset": cfg.dataset.name,
        "fingerprint": bundle.fingerprint, **bundle.splits,
        **({"train_subset": bundle.train_subset} if bundle.train_subset else {}),
    })


def _log_batch_grid(bundle, tracker: Tracker) -> None:
    """A grid of training images, once (without touching the training RNG)."""
    import torchvision

    with torch.random.fork_rng():
        n = min(32, len(bundle.train))
        x = torch.stack([bundle.train[i][0] for i in range(n)]).cpu().float()
    x = (x - x.amin()) / (x.amax() - x.amin() + 1e-8)
    tracker.image("train/batch", torchvision.utils.make_grid(x, nrow=8), 0)


def finish(cfg: Config, run_dir: Path, ctx: _Ctx) -> Optional[dict]:
    """Load the best checkpoint, evaluate val and (once) test, write results.json. In DDP every
    rank evaluates its shard; rank 0 writes (the others return None)."""
    state, bundle, plan, loaders, opts, tracker = ctx.state, ctx.bundle, ctx.state.plan, ctx.loaders, ctx.opts, ctx.tracker
    dist.barrier()  # rank 0 has written best.pt
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt", map_location=ctx.device)
    state.model.load_state_dict(best["model"])
    tasks, lim = list(bundle.tasks), cfg.trainer.limit_eval_batches
    net = state.runner
    val_c, test_c = (evaluate_split(net, loaders[s], tasks, opts, lim) for s in ("val", "test"))
    processes = {**dist.describe(ctx.device), "sync_bn": ctx.sync_bn}
    if not dist.world().main:
        return None
    val = report_split(run_dir, "val", val_c, bundle, None, ecfg=cfg.eval)
    test = report_split(run_dir, "test", test_c, bundle, None if ctx.sweeping else tracker, ecfg=cfg.eval,
                        model=state.model, objective=opts.objective)
    hist = state.history
    results = {
        "tlbench_version": __version__, "config_hash": config_hash(cfg), "dataset": cfg.dataset.name,
        "dataset_fingerprint": bundle.fingerprint, "model": cfg.model.name, "freeze": cfg.freeze.name,
        "seed": cfg.seed, "device": str(ctx.device), "processes": processes, "torch_threads": torch.get_num_threads(), "versions": versions(),
        "params": {"total": plan.total, "trainable": plan.trainable_count},
        "weights_source": getattr(state.model.backbone, "weights_source", None),
        "tasks": bundle.tasks, "class_counts": bundle.class_counts, "skipped_images": bundle.source.skipped,
        "train_subset": bundle.train_subset,
        "monitor": cfg.trainer.monitor, "best_epoch": state.best_epoch, "epochs_run": state.epoch,
        "early_stopped": state.epoch < cfg.trainer.max_epochs,
        "feature_cache": ctx.feature_cache,
        "speed": {"pipeline": bundle.pipeline, **ctx.speed.record(decision_applied(ctx)),
                  "cuda_peak_memory_gb": (torch.cuda.max_memory_allocated(ctx.device) / 2**30
                                          if ctx.device.type == "cuda" else None)},
        "time": {"total_s": time.perf_counter() - ctx.t0, "feature_cache_s": (ctx.feature_cache or {}).get("compute_s"),
                 "train_s_per_epoch": float(np.mean([h["train_seconds"] for h in hist])) if hist else None,
                 "val_s_per_epoch": float(np.mean([h["val_seconds"] for h in hist])) if hist else None},
        "epochs": hist, "val": val, "test": test, **results_fields(state.model, bundle),
        "eval_limit": _eval_limit(cfg, bundle, {"val": val, "test": test}),
    }
    if ctx.signals is not None:
        ctx.signals.finishing()  # from here on a signal waits: results.json and status.json stay in step
    write_json(run_dir / "results.json", results)
    _final_scalars(cfg, results, tracker, run_dir, ("val",) if ctx.sweeping else ("val", "test"))
    return results


def _eval_limit(cfg: Config, bundle, scored: dict) -> Optional[dict]:
    """``trainer.limit_eval_batches``: how many items of each split the final metrics are over
    (``None``: the whole splits). A smoke setting, said loudly: these are not the test split's
    metrics, and ``compare`` and the summary say so."""
    lim = cfg.trainer.limit_eval_batches
    if not lim:
        return None
    out = {"trainer.limit_eval_batches": lim}
    for split, metrics in scored.items():
        n = max((m.get("n", 0) for m in metrics.values()), default=0)
        out[split] = {"n": int(n), "of": len(getattr(bundle, split))}
    return out


def decision_applied(ctx: _Ctx) -> bool:
    return bool(ctx.decision is not None and ctx.decision.applied)


def _final_scalars(cfg: Config, results: dict, tracker: Tracker, run_dir: Path, splits=("val", "test")) -> None:
    """The final metrics (a sweep's job: val only) with the full hyperparameter set (HPARAMS in
    TensorBoard, params in MLflow, config in W&B)."""
    step = results["best_epoch"] or 0
    metrics = {}
    for split in splits:
        for t, m in results[split].items():
            for name in ("accuracy", "psnr", "ssim"):  # the headline (classification / reconstruction)
                if name in m:
                    tracker.scalars({f"{name}/{split}_best/{t}": m[name]}, step)
            for key in ("accuracy", "macro_f1", "loss", "psnr", "ssim"):
                if isinstance(m.get(key), (int, float)):
                    metrics[f"hparam/{split}_{key}_{t}"] = m[key]
    tracker.hparams(hparams(cfg), metrics, step)
