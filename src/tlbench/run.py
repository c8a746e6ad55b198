"""Wiring: Config -> data, model, freeze plan, optimizer -> ``fit`` -> one test pass -> run dir.

``train(cfg, run_dir)`` is what the CLI calls (and what tests and notebooks can call
without Hydra). The test split is evaluated exactly once, on the best-validation
checkpoint, after training.
"""

from __future__ import annotations

import logging
import random
import time
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
from .engine import FitHooks, LoopOptions, TrainState, amp_dtype, autocast, fit, select_device
from .errors import TlbenchError
from .models import build_backbone, build_model
from .optim import build_optimizer, build_scheduler
from .evaluate import evaluate_split, report_split
from .tracking import Tracker, ensure_log_file, write_json

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
        from .config import to_dict as _d

        old, new = ckpt.get("config", {}), _d(cfg)
        diff = [f"{g}.{k}" for g in new if isinstance(new[g], dict)
                for k in new[g] if old.get(g, {}).get(k) != new[g][k] and k not in ("resume", "progress")]
        raise TlbenchError(
            f"cannot resume {run_dir}: its checkpoint was made with a different config "
            f"(differs in: {', '.join(diff) or 'top-level keys'}); resume with the same overrides as the original run"
        )
    hook = _gradual_hook(cfg, plan_box)
    if hook:  # the optimizer groups as they were when the checkpoint was written
        hook(state, max(0, ckpt["epoch"] - 1))
    state.restore(ckpt)
    log.info("resumed from %s at epoch %d", run_dir / "checkpoints" / "last.pt", state.epoch)


def train(cfg: Config, run_dir: Path, stop_after: Optional[int] = None) -> dict:
    """Run one experiment into ``run_dir`` and return the results dict."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_log_file(run_dir)
    if cfg.trainer.resume and (run_dir / "results.json").is_file():
        log.info("%s already finished (results.json exists); nothing to resume", run_dir)
        import json

        return json.loads((run_dir / "results.json").read_text())
    if not cfg.trainer.resume and ((run_dir / "results.json").is_file()
                                   or (run_dir / "checkpoints" / "last.pt").is_file()):
        raise TlbenchError(
            f"{run_dir} already holds a run (results.json or checkpoints/last.pt) and nothing was "
            f"overwritten; continue it with trainer.resume={run_dir}, or write elsewhere (another hydra.run.dir)"
        )
    t0 = time.perf_counter()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    bundle, model, plan = build_everything(cfg)
    device = select_device(cfg.trainer.device)
    model.to(device)
    state = _new_state(cfg, model, plan, device)
    resuming = bool(cfg.trainer.resume) and (run_dir / "checkpoints" / "last.pt").is_file()
    if cfg.trainer.resume and cfg.trainer.resume != "auto" and not resuming:
        raise TlbenchError(f"trainer.resume={cfg.trainer.resume!r}: no checkpoints/last.pt in {run_dir}")
    _write_run_files(cfg, run_dir, bundle)
    tracker = Tracker(run_dir)
    plan_box = [plan]
    hooks = _hooks(cfg, run_dir, plan_box, tracker, stop_after, bundle.tasks)
    if resuming:
        _resume(cfg, run_dir, state, plan_box)
    else:
        hooks.save(state, "last.pt")  # an interrupted first epoch still leaves a resumable start
        _log_batch_grid(bundle, tracker)
    log.info("model: %d parameters, %d trainable; device %s", plan.total, plan.trainable_count, device)
    opts = LoopOptions(device=device, dtype=amp_dtype(device, cfg.trainer.precision),
                       grad_clip=cfg.trainer.grad_clip, progress=_progress(cfg),
                       class_weights=_class_weights(bundle, device))
    loaders = make_loaders(bundle, cfg, device)
    feature_s = None
    if can_cache_features(cfg, model):
        loaders, feature_s = cache_features(cfg, bundle, model, opts)
    try:
        fit(state, loaders, list(bundle.tasks), opts, cfg.trainer, hooks)
        results = finish(cfg, run_dir, bundle, state, plan_box[0], loaders, opts, tracker, device, t0,
                         feature_s)
    finally:
        tracker.close()
        model.inputs_are_features = False
    return results


def sweep_job(cfg: Config, run_dir: Path, sweep_dir: Path):
    """Relaunching a sweep: a job whose config already finished somewhere in ``sweep_dir`` is
    skipped (its results are returned); a job dir with ``last.pt`` but no results resumes."""
    import dataclasses
    import json

    want = config_hash(cfg)
    for other in sorted(Path(sweep_dir).rglob("config_hash")):
        done = other.parent / "results.json"
        if other.read_text().strip() == want and done.is_file():
            log.info("skipping: this config (hash %s) already finished in %s", want, other.parent)
            return cfg, json.loads(done.read_text())
    if (run_dir / "checkpoints" / "last.pt").is_file() and not cfg.trainer.resume:
        log.info("resuming the unfinished job in %s", run_dir)
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume="auto"))
    return cfg, None


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
