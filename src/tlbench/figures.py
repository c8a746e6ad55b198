"""A run's figures (``figures/``), built as matplotlib ``Figure`` objects (no pyplot state):

- :func:`confusion_figure`: counts and row-normalized percentages in every cell, colour = the
  share of the true class;
- :func:`reliability_figure`: accuracy per confidence bin against the diagonal, the gap, the
  ECE in the title (the same function and bins as ``results.json``'s ``ece``) and the number of
  items per bin;
- :func:`misclassified_figure`: a grid of misclassified images, each titled ``true -> predicted``
  with the predicted class's probability (most confident mistakes first).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .metrics import expected_calibration_error, reliability

TEXT_MAX_CLASSES = 20  # beyond this a cell is too small to hold its numbers


def new_figure(figsize):
    """A matplotlib Figure on the Agg canvas (no pyplot state, safe in any thread or process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def percent(f: float) -> str:
    """``0`` -> ``0%``, ``1`` -> ``100%``, else one decimal: ``45.6%``."""
    return f"{100 * f:.0f}%" if f in (0.0, 1.0) else f"{100 * f:.1f}%"


def cell_texts(cm) -> list[list[str]]:
    """``count\\nrow %`` per cell; an empty cell is just ``0``."""
    cm = np.asarray(cm, dtype=np.int64)
    totals = cm.sum(1)
    return [[f"{cm[i, j]}\n{percent(cm[i, j] / totals[i])}" if cm[i, j] else "0" for j in range(cm.shape[1])]
            for i in range(cm.shape[0])]


def confusion_figure(cm, class_names: Sequence[str], title: str):
    cm = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    totals = cm.sum(1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
    size = min(3.0 + 0.55 * k, 20)
    fig = new_figure((size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("share of the true class (row)")
    ax.set_xticks(range(k), list(class_names), rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    n, right = int(cm.sum()), int(np.trace(cm))
    acc = f", accuracy {percent(right / n)}" if n else ""
    cells = "count and % of the true class" if k <= TEXT_MAX_CLASSES else "colour: % of the true class"
    ax.set_title(f"{title}: n={n}{acc}\n(cells: {cells})", fontsize=9)
    if k <= TEXT_MAX_CLASSES:
        for i, row in enumerate(cell_texts(cm)):
            for j, text in enumerate(row):
                ax.text(j, i, text, ha="center", va="center", fontsize=7 if k <= 12 else 5.5,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def reliability_title(title: str, ece: float, bins: int, n: int) -> str:
    return f"{title}: ECE {ece:.4f} ({bins} bins, n={n})"


def reliability_figure(targets, probs, bins: int, title: str):
    """Accuracy per confidence bin (bars) against perfect calibration, the gap to it (red), the
    expected calibration error in the title, the items per bin below (with their counts)."""
    y, prob = np.asarray(targets), np.asarray(probs, dtype=np.float64)
    centers, acc, _, cnt = reliability(y, prob, bins)
    ece = expected_calibration_error(y, prob, bins)
    width = 1.0 / bins
    fig = new_figure((4.5, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    filled = cnt > 0
    top.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="C0", alpha=0.8, label="accuracy")
    gap = centers[filled] - acc[filled]
    top.bar(centers[filled], gap, bottom=acc[filled], width=width, edgecolor="red", facecolor="none", lw=0.8,
            hatch="///", label="gap to the diagonal")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(reliability_title(title, ece, bins, len(y)), fontsize=9)
    top.legend(loc="best", fontsize=7, framealpha=0.9)
    bottom.bar(centers, cnt, width=width, edgecolor="black", color="0.6")
    for x, c in zip(centers, cnt):
        if c:
            bottom.annotate(str(int(c)), (x, c), textcoords="offset points", xytext=(0, 1), ha="center",
                            va="bottom", fontsize=6)
    bottom.set_ylim(0, max(1, int(cnt.max())) * 1.3)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("items")
    fig.tight_layout()
    return fig


def _short(name: str, n: int = 12) -> str:
    name = str(name)
    return name if len(name) <= n else name[: n - 1] + "…"


def misclassified(targets, preds, probs, limit: int = 32) -> list[int]:
    """Positions of misclassified items, the most confident mistakes first (ties: in order)."""
    y, p, prob = np.asarray(targets), np.asarray(preds), np.asarray(probs, dtype=np.float64)
    wrong = np.flatnonzero(y != p)
    conf = prob[wrong, p[wrong]] if len(wrong) else np.zeros(0)
    return [int(i) for i in wrong[np.argsort(-conf, kind="stable")][:limit]]


def misclassified_label(index, true_name: str, pred_name: str, prob: float) -> str:
    return f"#{index}: {_short(true_name)} → {_short(pred_name)}\np={prob:.2f}"


def to_display(x) -> Optional[np.ndarray]:
    """A (C, H, W) image tensor/array as normalized for the model -> an (H, W) or (H, W, 3) array in
    [0, 1] (min-max per image); None when it is not an image (e.g. stored features)."""
    a = np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim != 3:
        return None
    a = (a - a.min()) / (a.max() - a.min() + 1e-8)
    return a[0] if a.shape[0] != 3 else a.transpose(1, 2, 0)


def misclassified_figure(images: Sequence[np.ndarray], labels: Sequence[str], title: str, ncols: int = 8):
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    height = 1.45 * nrows + 0.8
    fig = new_figure((1.25 * ncols, height))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, label in zip(axes, images, labels):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(label, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.85 / height, wspace=0.1,
                        hspace=0.45)
    return fig
