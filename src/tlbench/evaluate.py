"""Evaluation: predictions of a model on a split -> predictions files, metrics, reports,
figures; and ``tlbench eval RUN_DIR`` (re-evaluate a saved checkpoint, also on another root)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Optional

from .build import build_everything, progress_enabled, seed_everything
from .checkpoint import load as load_checkpoint
from .config import DatasetConfig, EvalConfig
from .data import SplitDataset
from .data.loaders import make_loaders
from .engine import LoopOptions, run_epoch, select_device
from .errors import TlbenchError
from .metrics import compute_metrics
from .models.cae import RECON_TASK
from .recon import objective, report_split as report_reconstruction
from .record import EarlyLog, close_log, open_log, publish_dir
from .tables import metric_name
from .tracking import log_test_figures, save_confusion, write_json, write_predictions, write_report
from .validation import check_dataset_keys, from_dict, to_config

log = logging.getLogger(__name__)


def evaluate_split(model, loader, tasks, opts, limit=None) -> dict:
    """Predictions of ``model`` on one split: ``{task: {targets, preds, probs}}``."""
    model.eval()
    return run_epoch(model, loader, tasks, opts, limit=limit, desc="eval", collect=True).collected


def _positive(task: str, names: list[str], ecfg) -> int:
    if len(names) != 2 or ecfg is None or ecfg.positive_class is None:
        return 1
    if ecfg.positive_class not in names:
        raise TlbenchError(f"eval.positive_class={ecfg.positive_class!r} is not a class of task {task!r}; "
                           f"choose one of {names}")
    return names.index(ecfg.positive_class)


def report_split(run_dir: Path, split: str, collected: dict, bundle, tracker, prefix: str = "",
                 ecfg=None, shown: Optional[str] = None, model=None, objective=None) -> dict:
    """Write predictions/reports/figures of one split; return ``{task: metrics}``. ``shown``: the
    split's name in the figures' titles (``tlbench eval split=val`` evaluates val as its test).
    A reconstruction run's split goes to ``recon.report_split`` (``model`` and ``objective`` draw
    its figure of reconstructions)."""
    if RECON_TASK in collected:
        return report_reconstruction(run_dir, split, collected, bundle, tracker, prefix, model, objective, shown)
    ecfg = ecfg or EvalConfig()
    out = {}
    idx = getattr(bundle, split).indices
    sub = "" if split == "test" else f"{split}/"
    for task, c in collected.items():
        names = bundle.tasks[task]
        indices = idx[: len(c["targets"])]
        write_predictions(run_dir / f"{prefix}predictions" / f"{sub}{task}.csv", indices, c["targets"],
                          c["preds"], c["probs"], names, bundle.source.relpaths)
        m = compute_metrics(c["targets"], c["preds"], c["probs"], names, topk=ecfg.topk,
                            positive=_positive(task, names, ecfg), bootstrap=ecfg.bootstrap,
                            bins=ecfg.calibration_bins)
        m["loss"] = m["log_loss"]
        out[task] = m
        if split == "test":
            write_report(run_dir, task, c["targets"], c["preds"], names, prefix)
            save_confusion(run_dir, task, m["confusion_matrix"], names, tracker, prefix, shown or split)
            log_test_figures(run_dir, task, c, names, getattr(bundle, "test"), tracker, ecfg, prefix, shown or split)
    return out


NAME_RULE = ("a plain folder-name part: letters, digits, '_', '-' and '.', at most 100 characters, "
             "no '/' and no '..'")


def check_name(name: Optional[str]) -> None:
    """``name=`` of ``tlbench eval``: a part of the folder name ``eval_<name>``, never a path."""
    if name is None:
        return
    if not (re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name) and ".." not in name):
        raise TlbenchError(f"name={name!r} is not valid: the evaluation goes to RUN_DIR/eval_<name>, so name must be "
                           f"{NAME_RULE}; e.g. name=held_out")


def eval_dir(run_dir: Path, split: str, name: Optional[str]) -> Path:
    """``run_dir/eval_<name or split>``: a folder of its own directly inside the run directory, never one
    of the run's own files or folders (results.json, predictions/, checkpoints/, ...) nor a link out."""
    check_name(name)
    run_dir = Path(run_dir)
    out = run_dir / f"eval_{split if name is None else name}"
    if out.is_symlink() or out.resolve().parent != run_dir.resolve() or not out.resolve().name.startswith("eval_"):
        raise TlbenchError(f"{out} is not a folder of its own inside {run_dir} (a link?); tlbench eval writes only "
                           f"into RUN_DIR/eval_<name>/: remove {out} or choose another name=")
    if out.exists() and not out.is_dir():
        raise TlbenchError(f"{out} exists and is not a folder; remove it or choose another name=")
    return out


def _remove_dead_partials(run_dir: Path, name: str) -> None:
    """The temp folders of evaluations into ``eval_<...>`` killed on this host (their process is gone)."""
    host = socket.gethostname()
    for p in run_dir.glob(f".{name}.partial-*"):
        owner, _, pid = p.name[len(f".{name}.partial-"):].rpartition("-")
        if owner != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def evaluate_run(run_dir: Path, split: str, dataset_updates: dict, name: Optional[str] = None) -> Path:
    """Re-evaluate a run's best checkpoint on one split (optionally of another dataset root
    with the same classes) into ``run_dir/eval_<name>/``: results.json (the metrics under the
    split's name), predictions/, reports, figures/, splits.json and eval.log (every line this
    evaluation logged, those before the folder existed included). The folder is written whole into a
    hidden temp folder beside it and then put in place of ``eval_<name>/`` in one step: a kill, a full
    disk or a second evaluation at any moment leaves the previous evaluation or this one, never a mix."""
    if split not in ("train", "val", "test", "all"):
        raise TlbenchError(f"split={split!r} is not valid; choose one of 'train', 'val', 'test', 'all'")
    run_dir = Path(run_dir)
    out = eval_dir(run_dir, split, name)  # a bad name= fails before anything is read or written
    early = EarlyLog().__enter__()  # held until eval.log exists; a refused evaluation writes no log
    work = None  # the temp folder this evaluation is written into
    try:
        log.info("tlbench eval %s: split=%s%s into %s", run_dir, split,
                 "".join(f" dataset.{k}={v}" for k, v in dataset_updates.items()), out)
        ckpt, ds, cfg = _eval_config(run_dir, dataset_updates)
        bundle, model, plan, device = _eval_build(cfg, ckpt)
        # only now, with the data and model built, is anything written into the run directory
        out = eval_dir(run_dir, split, name)  # again: the folder may have changed while the data was read
        _remove_dead_partials(run_dir, out.name)
        work = run_dir / f".{out.name}.partial-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        early.__exit__()
        early.flush_into(open_log(work, "eval.log"))
        model.to(device)
        log.info("model: %s parameters (%s trained by the run); device %s", f"{plan.total:,}",
                 f"{plan.trainable_count:,}", device)
        _select_split(bundle, split)
        _evaluate_into(work, run_dir, split, ds, cfg, ckpt, bundle, model, plan, device)
        log.info("written to %s: %s", out, ", ".join(sorted(
            str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())))
        close_log(work, "eval.log")
        publish_dir(work, eval_dir(run_dir, split, name))
        work = None
    finally:
        early.__exit__()
        if work is not None:  # not finished: the previous evaluation (if any) stays as it was
            close_log(work, "eval.log")
            shutil.rmtree(work, ignore_errors=True)
    return out


def _eval_config(run_dir: Path, dataset_updates: dict):
    """The run's best checkpoint and its config with the dataset updates: (ckpt, dataset, Config)."""
    import dataclasses

    best = run_dir / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(best)
    log.info("checkpoint %s: epoch %s, config_hash %s", best, ckpt.get("epoch"), ckpt.get("config_hash"))
    saved = ckpt["config"]
    merged = {**saved, "dataset": {**saved["dataset"], **dataset_updates}}
    # the updated dataset first: its key/type errors name dataset.KEY, and a key its dataset does
    # not read says so in terms of the run (a run recorded with a stray key: KEY=null clears it)
    ds = from_dict(DatasetConfig, merged["dataset"], "dataset")
    check_dataset_keys(ds, run_dir=run_dir)
    cfg = to_config(merged)
    # the checkpoint holds every weight: do not look for pretrained files again
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, weights=None,
                                                             init_from=None))
    log.info("data: %s%s", ds.name, f" at {ds.root}" if ds.root else "")
    return ckpt, ds, cfg


def _eval_build(cfg, ckpt: dict):
    """Data and model of the evaluation, the checkpoint's weights loaded: (bundle, model, plan, device)."""
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    bundle, model, plan = build_everything(cfg)
    if ckpt.get("tasks") and bundle.tasks != ckpt["tasks"]:
        raise TlbenchError(
            f"the evaluation data has other classes than the run was trained on: {bundle.tasks} "
            f"vs {ckpt['tasks']}; point dataset.root at data with the same class folders"
        )
    model.load_state_dict(ckpt["model"])
    return bundle, model, plan, select_device(cfg.trainer.device)


def _select_split(bundle, split: str) -> None:
    """``bundle.test`` becomes the split to evaluate (``all``: every item of the source, e.g. a held-out folder)."""
    if split == "all":
        bundle.test = SplitDataset(bundle.source, range(len(bundle.source)), list(bundle.tasks), bundle.eval_transform)
        bundle.splits = {"test": list(range(len(bundle.source)))}
    elif split != "test":
        bundle.test = getattr(bundle, split)
    log.info("evaluating %s: %d items (dataset_fingerprint %s)", split, len(bundle.test), bundle.fingerprint)


def _evaluate_into(work: Path, run_dir: Path, split: str, ds, cfg, ckpt: dict, bundle, model, plan, device) -> None:
    """Predictions, reports, figures, results.json and splits.json of the evaluation, into ``work``."""
    import dataclasses

    opts = LoopOptions(device=device, progress=progress_enabled(cfg), objective=objective(cfg, model.backbone.input_spec))
    loader = make_loaders(bundle, cfg, device)["test"]
    metrics = report_split(work, "test", evaluate_split(model, loader, list(bundle.tasks), opts), bundle, None,
                           ecfg=cfg.eval, shown=split, model=model, objective=opts.objective)
    write_json(work / "results.json", {
        "run_dir": str(run_dir), "split": split, "dataset": dataclasses.asdict(ds),
        "dataset_fingerprint": bundle.fingerprint, "checkpoint_epoch": ckpt["epoch"],
        "params": {"total": plan.total, "trainable": plan.trainable_count}, split: metrics,
    })
    write_json(work / "splits.json", bundle.splits)
    log.info("%s metrics (%s items):", split, next(iter(metrics.values()), {}).get("n"))
    for task, m in metrics.items():
        log.info("%s", _metric_line(task, m))


# ----------------------------------------------------------------------------- console summaries
# the metrics a summary line shows, in this order (those a task has)
HEADLINE = ("accuracy", "top3_accuracy", "top5_accuracy", "macro_f1", "weighted_f1", "log_loss", "ece",
            "sensitivity", "specificity", "roc_auc", "pr_auc", "mse", "psnr", "ssim")


def _metric_line(task: str, m: dict) -> str:
    ci = m.get("bootstrap_ci95") or {}
    parts = []
    for key in HEADLINE:
        if isinstance(m.get(key), (int, float)):
            text = f"{metric_name(key)} {m[key]:.4f}"
            if key in ci:
                text += f" (95% CI {ci[key][0]:.4f}-{ci[key][1]:.4f})"
            parts.append(text)
    return f"  {task}: {', '.join(parts)}"


def summary_lines(out_dir) -> list[str]:
    """What ``tlbench eval`` wrote into ``out_dir`` (``RUN_DIR/eval_<name>``), for the console: the
    split and checkpoint, per task the headline metrics (as in its ``results.json``), the files."""
    out_dir = Path(out_dir)
    res = json.loads((out_dir / "results.json").read_text())
    split = res.get("split", "test")
    metrics = res.get(split) or {}
    ds = res.get("dataset") or {}
    n = next(iter(metrics.values()), {}).get("n")
    where = f"{ds.get('name')}" + (f" at {ds['root']}" if ds.get("root") else "")
    lines = [f"{split} metrics of {res.get('run_dir')} (best checkpoint, epoch {res.get('checkpoint_epoch')}) "
             f"on {where}: {n} items"]
    lines += [_metric_line(task, m) for task, m in metrics.items() if isinstance(m, dict)]
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    lines.append(f"  files: {', '.join(files)}")
    return lines


def run_summary_lines(run_dir, results: dict, sweeping: bool = False, sweep_dir=None) -> list[str]:
    """The lines printed after a training run. In a sweep (Optuna included) a trial shows its
    *validation* metrics (the objective) and never its test metrics: those stay in
    ``results.json`` for the final table (``tlbench compare``), so nobody picks on test."""
    run_dir = Path(run_dir)
    p = results.get("params") or {}
    params = f"{p.get('trainable', 0):,} of {p.get('total', 0):,} parameters trained"
    split = "val" if sweeping else "test"
    metrics = results.get(split) or {}
    name = "accuracy" if all("accuracy" in m for m in metrics.values()) else "psnr"  # a reconstruction: PSNR (dB)
    values = ", ".join(f"{t} {m[name]:.4f}" for t, m in metrics.items())
    if sweeping:
        where = sweep_dir or run_dir.parent
        lines = [f"val {name}: {values} (the sweep's objective; best epoch {results.get('best_epoch')}, {params})",
                 f"run directory: {run_dir}",
                 f"test metrics are kept for the end of the sweep: tlbench compare {where}"]
        if (Path(where) / "tb").is_dir():
            lines.append(f"runs by their overrides: tensorboard --logdir {Path(where) / 'tb'}")
        return lines
    limited = (results.get("eval_limit") or {}).get("test")
    if limited:  # trainer.limit_eval_batches: not the test split's metrics
        values += (f" on {limited['n']:,} of {limited['of']:,} test items "
                   f"(trainer.limit_eval_batches={results['eval_limit']['trainer.limit_eval_batches']})")
    lines = [f"test {name}: {values} (best epoch {results.get('best_epoch')}, {params})",
             f"run directory: {run_dir}"]
    return lines + ([f"inspect with:  tensorboard --logdir {run_dir / 'tb'}"] if (run_dir / "tb").is_dir() else [])
