"""Wiring: Config -> data, model, freeze plan, optimizer -> ``fit`` -> one test pass -> run dir.

``train(cfg, run_dir)`` is what the CLI calls (and what tests and notebooks can call
without Hydra). The test split is evaluated exactly once, on the best-validation
checkpoint, after training.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __version__
from .checkpoint import load as load_checkpoint
from .checkpoint import save_atomic
from .config import Config, config_hash, to_dict
from .data import build_data
from .data.loaders import make_loaders
from .engine import (Diverged, FitHooks, Interrupted, LoopOptions, TrainState, amp_dtype, autocast, fit,
                     select_device)
from .errors import TlbenchError
from .models import build_backbone, build_model
from .optim import build_optimizer, build_scheduler
from .evaluate import evaluate_split, report_split
from .record import (EarlyLog, RunLock, check_writable, close_log, config_diff, is_fresh, open_log,
                     write_hydra_record, write_status)
from .tracking import Tracker, write_json

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def versions() -> dict:
    import torchvision

    try:
        import timm

        timm_v = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        timm_v = None
    return {"tlbench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm_v}


def build_everything(cfg: Config):
    """Data, model and freeze plan from the config (no training state)."""
    from .freeze import apply_freeze

    backbone = build_backbone(cfg.model)
    bundle = build_data(cfg.dataset, backbone.input_spec)
    sample = torch.stack([bundle.train[i][0] for i in range(min(2, len(bundle.train)))])
    model = build_model(backbone, {t: len(n) for t, n in bundle.tasks.items()}, cfg.head, sample)
    plan = apply_freeze(model, cfg.freeze, cfg.optim)
    return bundle, model, plan


def _progress(cfg: Config) -> bool:
    import sys

    return cfg.trainer.progress and sys.stderr.isatty()


def _new_state(cfg: Config, model, plan, device) -> TrainState:
    optimizer = build_optimizer(plan.groups, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.trainer.max_epochs)
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and cfg.trainer.precision == "16-mixed") else None
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def _hooks(cfg: Config, run_dir: Path, plan_box: list, tracker: Tracker, stop_after, tasks) -> FitHooks:
    from .freeze import set_bn_eval

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
        scalars.update({f"lr/{g}": lr for g, lr in rec["lr"].items()})
        tracker.scalars(scalars, rec["epoch"])
        accs = " ".join(f"{t}={a:.4f}" for t, a in rec["val"]["accuracy"].items())
        log.info("epoch %d/%d train_loss=%.4f val_loss=%.4f val_acc[%s] (%.1fs+%.1fs)%s",
                 rec["epoch"], cfg.trainer.max_epochs, rec["train"]["loss"], rec["val"]["loss"], accs,
                 rec["train_seconds"], rec["val_seconds"], " *best*" if state.best_epoch == rec["epoch"] else "")

    def train_mode(model) -> None:
        model.train()
        set_bn_eval(model, plan_box[0])
        if backbone_frozen(model):  # a frozen feature extractor runs as in inference (no dropout)
            model.backbone.eval()

    return FitHooks(save=save, log_epoch=log_epoch, before_epoch=_gradual_hook(cfg, plan_box),
                    train_mode=train_mode, stop_after=stop_after)


def _gradual_hook(cfg: Config, plan_box: list):
    if not cfg.freeze.gradual:
        return None
    from .freeze import gradual_unfreeze

    def before_epoch(state: TrainState, epoch: int) -> None:
        new = gradual_unfreeze(state.model, cfg.freeze, cfg.optim, epoch)
        if new is None:
            return
        plan_box[0] = new
        # new optimizer groups; parameters that trained already keep their optimizer state
        old = state.optimizer
        state.optimizer = build_optimizer(new.groups, cfg.optim)
        for p, s in old.state.items():
            state.optimizer.state[p] = s
        state.scheduler = build_scheduler(state.optimizer, cfg.sched, cfg.trainer.max_epochs)
        if state.scheduler is not None and not isinstance(
                state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            import warnings

            with warnings.catch_warnings():  # fast-forward the schedule to this epoch
                warnings.simplefilter("ignore")
                for _ in range(epoch):
                    state.scheduler.step()

    return before_epoch


def _resume(cfg: Config, run_dir: Path, state: TrainState, plan_box: list) -> None:
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    if ckpt.get("config_hash") != config_hash(cfg):
        diff = config_diff(ckpt.get("config") or {}, to_dict(cfg))
        raise TlbenchError(
            f"cannot resume {run_dir}: its checkpoint was made with a different config "
            f"(differs in: {', '.join(diff) or 'its config hash'}); resume with the same overrides as the original run"
        )
    hook = _gradual_hook(cfg, plan_box)
    if hook:  # the optimizer groups as they were when the checkpoint was written
        hook(state, max(0, ckpt["epoch"] - 1))
    state.restore(ckpt)
    log.info("resumed from %s at epoch %d", run_dir / "checkpoints" / "last.pt", state.epoch)


def _old_config(run_dir: Path) -> Optional[dict]:
    """The typed config a run directory was made with, as a dict (for naming differences)."""
    import yaml

    from .config import to_config

    try:
        data = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        return to_dict(to_config(data))
    except Exception:  # noqa: BLE001 - an old or damaged record: fall back to the checkpoint
        pass
    try:
        return load_checkpoint(run_dir / "checkpoints" / "last.pt").get("config")
    except Exception:  # noqa: BLE001
        return None


def _differs(cfg: Config, run_dir: Path) -> Optional[str]:
    """None when ``run_dir`` was made with ``cfg`` (same config hash), else the keys that differ."""
    path = run_dir / "config_hash"
    saved = path.read_text().strip() if path.is_file() else None
    if saved is None:
        try:
            saved = json.loads((run_dir / "results.json").read_text()).get("config_hash")
        except (OSError, ValueError):
            saved = None
    if saved == config_hash(cfg):
        return None
    old = _old_config(run_dir)
    diff = config_diff(old, to_dict(cfg)) if isinstance(old, dict) else []
    return ", ".join(diff) or "its config hash"


def _preflight(cfg: Config, run_dir: Path, fresh: bool) -> Optional[dict]:
    """Checks against what ``run_dir`` already holds, before anything is written. Returns the
    results of a finished run that ``trainer.resume`` points at with the same config."""
    resume = cfg.trainer.resume
    if fresh:
        if resume and resume != "auto":
            if not (run_dir / ".hydra" / "overrides.yaml").is_file():
                raise TlbenchError(f"trainer.resume={resume!r}: {run_dir} holds no run to resume (no checkpoints/last.pt)")
            log.info("%s stopped before its first checkpoint: starting it from the beginning", run_dir)
        return None
    finished, has_last = (run_dir / "results.json").is_file(), (run_dir / "checkpoints" / "last.pt").is_file()
    if not finished and not has_last:
        raise TlbenchError(
            f"{run_dir} is not empty and holds no tlbench run to continue (no results.json, no "
            f"checkpoints/last.pt); nothing was changed there. Write elsewhere (another hydra.run.dir), or "
            f"delete the folder if it is the leftover of a run that never started")
    if not resume:
        raise TlbenchError(
            f"{run_dir} already holds a run ({'results.json' if finished else 'checkpoints/last.pt'}) and nothing "
            f"was overwritten; continue it with trainer.resume={run_dir}, or write elsewhere (another hydra.run.dir)")
    diff = _differs(cfg, run_dir)
    if diff:
        raise TlbenchError(
            f"cannot resume {run_dir}: it was made with a different config (differs in: {diff}); nothing was "
            f"changed there. Resume with the run's own overrides (trainer.resume={run_dir} alone), or start "
            f"a new run elsewhere")
    if finished:
        log.info("%s already finished with this config (results.json exists); nothing to resume", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    return None


def train(cfg: Config, run_dir: Path, stop_after: Optional[int] = None,
          record: Optional[dict[str, str]] = None) -> dict:
    """Run one experiment into ``run_dir`` and return the results dict. ``record``: the
    ``.hydra/`` files (name -> text) to write when the run starts (the CLI passes them).

    Nothing is written before the run starts (config checked, directory locked, data and model
    built): a refused run leaves an existing directory unchanged, a new one with at most
    ``status.json`` saying ``failed``."""
    run_dir = Path(run_dir)
    check_writable(run_dir, "the run directory")
    fresh = is_fresh(run_dir)
    early = EarlyLog().__enter__()
    try:
        done = _preflight(cfg, run_dir, fresh)
        if done is not None:
            return done
        with RunLock(run_dir):
            try:
                ctx = _setup(cfg, run_dir, stop_after)
            except TlbenchError as e:
                if is_fresh(run_dir):
                    write_status(run_dir, "failed", str(e))
                raise
            early.__exit__()
            early.flush_into(open_log(run_dir))
            return _run(cfg, run_dir, ctx, record)
    finally:
        early.__exit__()
        close_log(run_dir)


@dataclass
class _Ctx:
    """What ``_setup`` builds before anything is written."""

    bundle: object
    plan_box: list
    state: TrainState
    device: torch.device
    resuming: bool
    stop_after: Optional[int]
    t0: float


def _setup(cfg: Config, run_dir: Path, stop_after: Optional[int]) -> _Ctx:
    t0 = time.perf_counter()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    bundle, model, plan = build_everything(cfg)
    device = select_device(cfg.trainer.device)
    model.to(device)
    state = _new_state(cfg, model, plan, device)
    resuming = bool(cfg.trainer.resume) and (run_dir / "checkpoints" / "last.pt").is_file()
    return _Ctx(bundle, [plan], state, device, resuming, stop_after, t0)


def _run(cfg: Config, run_dir: Path, ctx: _Ctx, record: Optional[dict[str, str]]) -> dict:
    """The run has started: write its record, train, evaluate; keep ``status.json`` true."""
    state, bundle, plan_box = ctx.state, ctx.bundle, ctx.plan_box
    if not ctx.resuming:
        write_hydra_record(run_dir, record)
    write_status(run_dir, "running", "resumed" if ctx.resuming else "started", state.epoch, state.step)
    tracker = None
    try:
        _write_run_files(cfg, run_dir, bundle)
        tracker = Tracker(run_dir)
        hooks = _hooks(cfg, run_dir, plan_box, tracker, ctx.stop_after, bundle.tasks)
        if ctx.resuming:
            _resume(cfg, run_dir, state, plan_box)
        else:
            hooks.save(state, "last.pt")  # an interrupted first epoch still leaves a resumable start
            _log_batch_grid(bundle, tracker)
        log.info("model: %d parameters, %d trainable; device %s", plan_box[0].total, plan_box[0].trainable_count,
                 ctx.device)
        opts = LoopOptions(device=ctx.device, dtype=amp_dtype(ctx.device, cfg.trainer.precision),
                           grad_clip=cfg.trainer.grad_clip, progress=_progress(cfg),
                           class_weights=_class_weights(bundle, ctx.device))
        loaders = make_loaders(bundle, cfg, ctx.device)
        feature_s = None
        if can_cache_features(cfg, state.model):
            loaders, feature_s = cache_features(cfg, bundle, state.model, opts)
        try:
            fit(state, loaders, list(bundle.tasks), opts, cfg.trainer, hooks)
            results = finish(cfg, run_dir, bundle, state, plan_box[0], loaders, opts, tracker, ctx.device, ctx.t0,
                             feature_s)
        finally:
            state.model.inputs_are_features = False
    except Interrupted as e:
        write_status(run_dir, "interrupted", f"{e}; resume with: tlbench trainer.resume={run_dir}",
                     state.epoch, state.step)
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
        if tracker is not None:
            tracker.close()
    write_status(run_dir, "finished", "", state.epoch, state.step)
    return results


def sweep_job(cfg: Config, run_dir: Path, sweep_dir: Path):
    """Relaunching a sweep: a job whose config (full hash) already finished somewhere in
    ``sweep_dir`` is skipped (its results are returned); a job dir holding an unfinished run of
    the same config resumes; a job dir holding a run of another config is refused (exit 2,
    naming the keys that differ): the sweep was changed, so it needs its own hydra.sweep.dir."""
    import dataclasses

    want = config_hash(cfg)
    for other in sorted(Path(sweep_dir).rglob("config_hash")):
        done = other.parent / "results.json"
        if other.read_text().strip() == want and done.is_file():
            log.info("skipping: this config (hash %s) already finished in %s", want, other.parent)
            return cfg, json.loads(done.read_text())
    if is_fresh(run_dir) or cfg.trainer.resume:
        return cfg, None
    diff = _differs(cfg, run_dir)
    if diff:
        raise TlbenchError(
            f"{run_dir} holds a job of an earlier sweep with another config (differs in: {diff}); nothing was "
            f"changed there. A changed sweep needs its own folder: add hydra.sweep.dir=NEW_DIR")
    log.info("resuming the unfinished job in %s", run_dir)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume="auto")), None


def backbone_frozen(model) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def can_cache_features(cfg: Config, model) -> bool:
    """The backbone is a fixed function of the image: no trainable parameter, no random
    augmentation, no gradual unfreezing. Then its features are computed once."""
    return (cfg.trainer.cache_features and cfg.dataset.augment == "none" and not cfg.freeze.gradual
            and backbone_frozen(model))


def cache_features(cfg: Config, bundle, model, opts: LoopOptions) -> tuple[dict, float]:
    """Run the frozen backbone once over each split; train/evaluate the heads on the result.
    Returns the loaders over the features and the seconds the feature pass took."""
    import copy

    from torch.utils.data import DataLoader

    from .data import TensorSplit

    t0 = time.perf_counter()
    model.eval()
    cached = copy.copy(bundle)
    limits = {"train": cfg.trainer.limit_train_batches, "val": cfg.trainer.limit_eval_batches,
              "test": cfg.trainer.limit_eval_batches}
    for name in ("train", "val", "test"):
        ds = getattr(bundle, name)
        n = len(ds) if not limits[name] else min(len(ds), limits[name] * cfg.batch_size)
        sub = torch.utils.data.Subset(ds, range(n))
        feats = []
        with torch.inference_mode():
            for x, _ in DataLoader(sub, batch_size=max(cfg.batch_size, 64), shuffle=False):
                with autocast(opts):
                    feats.append(model.features(x.to(opts.device)).float().cpu())
        labels = {t: ds.labels[t][:n] for t in bundle.tasks}
        setattr(cached, name, TensorSplit(torch.cat(feats), labels, ds.indices[:n]))
    model.inputs_are_features = True
    seconds = time.perf_counter() - t0
    log.info("frozen backbone: features of %d images computed once in %.1fs; the head(s) train on them",
             sum(len(getattr(cached, s)) for s in ("train", "val", "test")), seconds)
    return make_loaders(cached, cfg, opts.device), seconds


def _class_weights(bundle, device):
    if not bundle.class_weights:
        return None
    return {t: torch.tensor(w, dtype=torch.float32, device=device) for t, w in bundle.class_weights.items()}


def _write_run_files(cfg: Config, run_dir: Path, bundle) -> None:
    (run_dir / "config_hash").write_text(config_hash(cfg) + "\n")
    write_json(run_dir / "splits.json", {
        "split_seed": cfg.dataset.split_seed, "dataset": cfg.dataset.name,
        "fingerprint": bundle.fingerprint, **bundle.splits,
    })


def _log_batch_grid(bundle, tracker: Tracker) -> None:
    """A grid of training images, once (without touching the training RNG)."""
    import torchvision

    with torch.random.fork_rng():
        n = min(32, len(bundle.train))
        x = torch.stack([bundle.train[i][0] for i in range(n)]).cpu().float()
    x = (x - x.amin()) / (x.amax() - x.amin() + 1e-8)
    tracker.image("train/batch", torchvision.utils.make_grid(x, nrow=8), 0)


def finish(cfg, run_dir, bundle, state, plan, loaders, opts, tracker, device, t0, feature_s=None) -> dict:
    """Load the best checkpoint, evaluate val and (once) test, write results.json."""
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt", map_location=device)
    state.model.load_state_dict(best["model"])
    tasks, lim = list(bundle.tasks), cfg.trainer.limit_eval_batches
    val = report_split(run_dir, "val", evaluate_split(state.model, loaders["val"], tasks, opts, lim), bundle,
                       None, ecfg=cfg.eval)
    test = report_split(run_dir, "test", evaluate_split(state.model, loaders["test"], tasks, opts, lim),
                        bundle, tracker, ecfg=cfg.eval)
    hist = state.history
    results = {
        "tlbench_version": __version__, "config_hash": config_hash(cfg), "dataset": cfg.dataset.name,
        "dataset_fingerprint": bundle.fingerprint, "model": cfg.model.name, "freeze": cfg.freeze.name,
        "seed": cfg.seed, "device": str(device), "versions": versions(),
        "params": {"total": plan.total, "trainable": plan.trainable_count},
        "weights_source": getattr(state.model.backbone, "weights_source", None),
        "tasks": bundle.tasks, "class_counts": bundle.class_counts, "skipped_images": bundle.source.skipped,
        "monitor": cfg.trainer.monitor, "best_epoch": state.best_epoch, "epochs_run": state.epoch,
        "early_stopped": state.epoch < cfg.trainer.max_epochs,
        "time": {"total_s": time.perf_counter() - t0, "feature_cache_s": feature_s,
                 "train_s_per_epoch": float(np.mean([h["train_seconds"] for h in hist])) if hist else None,
                 "val_s_per_epoch": float(np.mean([h["val_seconds"] for h in hist])) if hist else None},
        "epochs": hist, "val": val, "test": test,
    }
    write_json(run_dir / "results.json", results)
    _final_scalars(cfg, results, tracker, run_dir)
    return results


def _hparam_keys(run_dir: Path) -> Optional[set]:
    """The keys the user chose on the command line (Hydra's overrides.yaml), as dotted names;
    a group choice ``model=vgg16`` means ``model.name``. None when the run has no Hydra files."""
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    keys = {"dataset.name", "model.name", "freeze.name", "seed"}
    for o in yaml.safe_load(path.read_text()) or []:
        key = o.split("=", 1)[0].lstrip("+~")
        if not key.startswith("hydra"):
            keys.add(key if "." in key or key in ("seed", "experiment") else f"{key}.name")
    return keys


def _final_scalars(cfg: Config, results: dict, tracker: Tracker, run_dir: Path) -> None:
    step = results["best_epoch"] or 0
    metrics = {}
    for split in ("val", "test"):
        for t, m in results[split].items():
            tracker.scalars({f"accuracy/{split}_best/{t}": m["accuracy"]}, step)
            metrics[f"hparam/{split}_accuracy_{t}"] = m["accuracy"]
            metrics[f"hparam/{split}_loss_{t}"] = m["loss"]
    flat = {}
    for group, values in to_dict(cfg).items():
        if isinstance(values, dict):
            flat.update({f"{group}.{k}": v for k, v in values.items() if k not in ("resume", "progress")})
        else:
            flat[group] = values
    keys = _hparam_keys(run_dir)  # a sweep's HPARAMS table shows what the sweep varied
    tracker.hparams({k: v for k, v in flat.items() if keys is None or k in keys}, metrics)


def plan_text(cfg: Config, as_json: bool) -> str:
    """``tlbench plan``: build the model and freeze plan (data only for the task sizes)."""
    from .plan import plan_report

    seed_everything(cfg.seed)
    _, model, plan = build_everything(cfg)
    return plan_report(model, plan, as_json)


def download(cfg: Config) -> list[str]:
    """``tlbench download``: fetch the model's pretrained weights and the dataset into their
    caches/roots (on a machine with network, for compute nodes that have none)."""
    import dataclasses

    from .data import load_source
    from .models import SCRATCH

    done = []
    if cfg.model.name not in SCRATCH:
        from .models.backbones import download_weights

        done.append(f"weights for model={cfg.model.name}: {download_weights(cfg.model)}")
    if cfg.dataset.name in ("cifar10", "emnist"):
        src = load_source(dataclasses.replace(cfg.dataset, download=True))
        done.append(f"dataset={cfg.dataset.name}: {len(src)} images in {cfg.dataset.root}")
    elif cfg.dataset.name != "sklearn_digits":
        done.append(f"dataset={cfg.dataset.name} has no downloader: put the folders under "
                    f"{cfg.dataset.root} (docs/datasets.md says where to get them)")
    return done
