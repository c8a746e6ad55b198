"""Everything a run writes besides checkpoints: TensorBoard, predictions, reports, figures,
``results.json`` and ``train.log``. One place owns the TensorBoard writer.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np

from .metrics import classification_report

log = logging.getLogger(__name__)


class Tracker:
    """TensorBoard scalars/images/hparams under ``run_dir/tb``."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def image(self, tag: str, img, step: int = 0) -> None:
        if self.writer:
            self.writer.add_image(tag, img, step)

    def figure(self, tag: str, fig, step: int = 0) -> None:
        if self.writer:
            self.writer.add_figure(tag, fig, step, close=False)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.writer.add_hparams(clean, metrics, run_name=".")

    def close(self) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()


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


def confusion_figure(cm, class_names, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = len(class_names)
    size = min(4 + 0.35 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    return fig


def save_confusion(run_dir: Path, task: str, cm, class_names, tracker: Tracker | None, prefix: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = confusion_figure(cm, class_names, f"{task} (test)")
    (run_dir / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(run_dir / "figures" / f"{prefix}confusion_{task}.png", dpi=100)
    if tracker:
        tracker.figure(f"confusion/{task}", fig)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def log_test_figures(run_dir: Path, task: str, c: dict, names, dataset, tracker, ecfg, prefix: str = "") -> None:
    """Reliability diagram (PNG + TensorBoard), PR curve for binary tasks, misclassified grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import reliability

    y, p, prob = np.asarray(c["targets"]), np.asarray(c["preds"]), np.asarray(c["probs"])
    centers, acc, conf, cnt = reliability(y, prob, ecfg.calibration_bins)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.bar(centers, np.nan_to_num(acc), width=1.0 / len(centers), edgecolor="black", alpha=0.7, label="accuracy")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{task}: reliability (test)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    (run_dir / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(run_dir / "figures" / f"{prefix}reliability_{task}.png", dpi=100)
    if tracker:
        tracker.figure(f"reliability/{task}", fig)
    plt.close(fig)
    if tracker and tracker.writer:
        if len(names) == 2:
            tracker.writer.add_pr_curve(f"pr_curve/{task}", y, prob[:, 1], 0)
        _misclassified_grid(task, y, p, dataset, tracker)


def _misclassified_grid(task, y, p, dataset, tracker, n: int = 32) -> None:
    import torch
    import torchvision

    wrong = np.flatnonzero(y != p)[:n]
    if not len(wrong) or dataset is None:
        return
    with torch.random.fork_rng():
        x = torch.stack([dataset[int(i)][0] for i in wrong]).cpu().float()
    if x.dim() != 4:  # cached features, not images
        return
    x = (x - x.amin()) / (x.amax() - x.amin() + 1e-8)
    tracker.image(f"misclassified/{task}", torchvision.utils.make_grid(x, nrow=8), 0)
