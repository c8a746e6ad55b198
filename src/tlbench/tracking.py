"""Everything a run writes besides checkpoints: TensorBoard, predictions, reports, figures,
``results.json`` and ``train.log``. One place owns the TensorBoard writer.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .figures import (confusion_figure, misclassified, misclassified_figure, misclassified_label,
                      reliability_figure, to_display)
from .engine import Interrupted
from .metrics import classification_report

log = logging.getLogger(__name__)


def warn_off(logger: str, e: BaseException) -> None:
    log.warning("logger %s failed and is off for the rest of this run (%s: %s); the run goes on, and "
                "results.json and the checkpoints do not depend on it", logger, type(e).__name__, e)


def exit_status() -> str:
    """How the run is ending, as seen from a ``finally`` block: finished | interrupted | failed."""
    exc = sys.exc_info()[1]
    if exc is None:
        return "finished"

    return "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"


class Tracker:
    """What a run reports to while it trains: TensorBoard under ``run_dir/tb`` (when ``enabled``)
    and the optional loggers of ``tlbench.loggers`` (``backends``: scalars and hyperparameters).
    A logger that fails is switched off with a warning (``warn_off``): the run, its
    checkpoints and ``results.json`` never depend on one."""

    def __init__(self, run_dir: Path, enabled: bool = True, backends=()):
        self.run_dir = Path(run_dir)
        self.writer = None
        self.backends = list(backends)
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def _tb(self, fn, *args) -> None:
        if self.writer:
            try:
                fn(*args)
            except Exception as e:
                warn_off("tensorboard", e)
                self.writer = None

    def _each(self, method: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:
                warn_off(b.name, e)
                self.backends.remove(b)

    def scalars(self, values: dict[str, float], step: int) -> None:
        def tb():
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

        self._tb(tb)
        self._each("scalars", values, step)

    def image(self, tag: str, img, step: int = 0) -> None:
        self._tb(lambda: self.writer.add_image(tag, img, step))

    def figure(self, tag: str, fig, step: int = 0) -> None:
        self._tb(lambda: self.writer.add_figure(tag, fig, step, close=False))

    def hparams(self, hparams: dict, metrics: dict, step: int = 0) -> None:
        """HPARAMS in this run's own events file (no second writer): the hyperparameters with the
        final metrics, which are also written as scalars (the dashboard reads them from there)."""
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}

        def tb():
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            writer = self.writer._get_file_writer()
            for summary in hparams_summary(clean, metrics):
                writer.add_summary(summary)
            for tag, v in metrics.items():
                self.writer.add_scalar(tag, v, step)

        self._tb(tb)
        self._each("hparams", clean, metrics, step)

    def close(self) -> None:
        """Flush and close every logger; an optional one learns how the run ended (read from the
        exception being handled, if any: ``loggers.exit_status``)."""
        status = exit_status()
        self._each("close", status)
        self.backends = []
        if self.writer:
            self._tb(self.writer.flush)
        if self.writer:  # a flush that failed (full disk) switched the writer off
            self._tb(self.writer.close)
        self.writer = None


def write_predictions(path: Path, indices, targets, preds, probs, class_names, relpaths=None) -> None:
    """``index,target,pred,target_name,pred_name[,path],prob_0..prob_{K-1}`` one row per item."""
    path.parent.mkdir(parents=True, exist_ok=True)
    k = len(class_names)
    header = ["index", "target", "pred", "target_name", "pred_name"]
    header += ["path"] if relpaths is not None else []
    header += [f"prob_{j}" for j in range(k)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, (idx, t, p, pr) in enumerate(zip(indices, targets, preds, probs)):
            row = [int(idx), int(t), int(p), class_names[t], class_names[p]]
            row += [relpaths[int(idx)]] if relpaths is not None else []
            row += [f"{float(x):.8g}" for x in pr]
            w.writerow(row)


def write_report(run_dir: Path, task: str, targets, preds, class_names, prefix: str = "") -> None:
    text = classification_report(targets, preds, class_names)
    (run_dir / f"{prefix}classification_report_{task}.txt").write_text(text)


def save_figure(fig, path: Path) -> Path:
    """Write one figure (PNG, 100 dpi); the one place ``figures/`` files are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def save_confusion(run_dir: Path, task: str, cm, class_names, tracker: Tracker | None, prefix: str = "",
                   split: str = "test") -> None:
    """``figures/confusion_<task>.png``: counts and row-normalized percentages (and TensorBoard)."""
    fig = confusion_figure(cm, class_names, f"{task} ({split})")
    save_figure(fig, run_dir / "figures" / f"{prefix}confusion_{task}.png")
    if tracker:
        tracker.figure(f"confusion/{task}", fig)


def write_json(path: Path, data: dict) -> None:
    """Atomically and durably (temp file + fsync + rename; a failed write leaves the old file and no temp)."""
    from .record import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False))


def log_test_figures(run_dir: Path, task: str, c: dict, names, dataset, tracker, ecfg, prefix: str = "",
                     split: str = "test") -> None:
    """``figures/reliability_<task>.png`` (ECE in the title, items per bin) and
    ``figures/misclassified_<task>.png`` (labelled), also in TensorBoard with the PR curve of a
    binary task."""
    y, prob = np.asarray(c["targets"]), np.asarray(c["probs"], dtype=np.float64)
    fig = reliability_figure(y, prob, ecfg.calibration_bins, f"{task} ({split})")
    save_figure(fig, run_dir / "figures" / f"{prefix}reliability_{task}.png")
    if tracker:
        tracker.figure(f"reliability/{task}", fig)
    if tracker and tracker.writer and len(names) == 2:
        tracker._tb(lambda: tracker.writer.add_pr_curve(f"pr_curve/{task}", y, prob[:, 1], 0))
    save_misclassified(run_dir, task, c, names, dataset, tracker, prefix, split)


def save_misclassified(run_dir: Path, task: str, c: dict, names, dataset, tracker=None, prefix: str = "",
                       split: str = "test", limit: int = 32):
    """``figures/misclassified_<task>.png``: the most confident mistakes, each image titled
    ``#index: true → predicted`` with the predicted class's probability (index = the dataset item,
    as in the predictions file). Nothing when there is no mistake or the split holds features."""
    import torch

    y, p, prob = np.asarray(c["targets"]), np.asarray(c["preds"]), np.asarray(c["probs"], dtype=np.float64)
    picked = misclassified(y, p, prob, limit)
    if not picked or dataset is None:
        return None
    images = []
    with torch.random.fork_rng():  # a dataset's transform never moves the run's RNG
        for i in picked:
            img = to_display(dataset[i][0])
            if img is None:  # stored features, not images
                return None
            images.append(img)
    indices = getattr(dataset, "indices", None)
    labels = [misclassified_label(indices[i] if indices is not None else i, names[y[i]], names[p[i]], prob[i, p[i]])
              for i in picked]
    wrong = int(np.sum(y != p))
    title = (f"{task} ({split}): {len(picked)} of {wrong} misclassified images, most confident first\n"
             f"#dataset index: true → predicted, p = probability of the predicted class")
    fig = misclassified_figure(images, labels, title)
    path = save_figure(fig, run_dir / "figures" / f"{prefix}misclassified_{task}.png")
    if tracker:
        tracker.figure(f"misclassified/{task}", fig)
    return path


def write_epochs_csv(path: Path, history: list[dict]) -> None:
    """``metrics.csv``: one row per epoch (train/val loss and accuracy per task, learning rates,
    seconds), rewritten whole and atomically from the run's history (a resumed run's file is
    complete too)."""
    if not history:
        return
    tasks = list(history[0]["val"]["accuracy"])
    groups = list(history[0]["lr"])
    header = ["epoch", "train_loss", "val_loss"]
    header += [f"{s}_accuracy_{t}" for s in ("train", "val") for t in tasks]
    f1 = "macro_f1" in history[0]["val"]
    header += [f"val_macro_f1_{t}" for t in tasks] if f1 else []
    ece = bool(history[0]["val"].get("ece"))  # classification epochs recorded since the ECE was added
    header += [f"val_ece_{t}" for t in tasks] if ece else []
    if len(tasks) > 1:
        header += [f"{s}_loss_{t}" for s in ("train", "val") for t in tasks]
    header += [f"lr_{g}" for g in groups] + ["train_seconds", "val_seconds"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for h in history:
        row = [h["epoch"], h["train"]["loss"], h["val"]["loss"]]
        row += [h[s]["accuracy"][t] for s in ("train", "val") for t in tasks]
        row += [h["val"]["macro_f1"][t] for t in tasks] if f1 else []
        row += [h["val"].get("ece", {}).get(t) for t in tasks] if ece else []
        if len(tasks) > 1:
            row += [h[s]["task_loss"][t] for s in ("train", "val") for t in tasks]
        row += [h["lr"].get(g) for g in groups] + [h["train_seconds"], h["val_seconds"]]
        w.writerow([f"{v:.8g}" if isinstance(v, float) else v for v in row])
    from .record import atomic_write_text

    atomic_write_text(Path(path), buf.getvalue())
