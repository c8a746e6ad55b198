"""Metrics from (targets, predictions, probabilities) via scikit-learn.

Everything here is a pure function of what ``predictions/<task>.csv`` holds, so every
number in ``results.json`` can be recomputed from that file.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn import metrics as skm


def compute_metrics(targets, preds, probs, class_names: list[str], topk=(1, 3), positive: int = 1,
                    bootstrap: int = 0, bins: int = 15, seed: int = 0) -> dict:
    """Accuracy, top-k, macro/weighted P/R/F1, per-class P/R/F1/support, log-loss, confusion,
    expected calibration error; for binary tasks also sensitivity/specificity (``positive`` is
    the positive class index) and ROC-AUC/PR-AUC; optional bootstrap 95% CIs.
    """
    y, p, prob = np.asarray(targets), np.asarray(preds), np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    labels = list(range(k))
    out: dict = {"n": int(len(y)), "accuracy": float(np.mean(y == p)) if len(y) else 0.0}
    for kk in topk:
        if 1 < kk < k:
            top = np.argsort(-prob, axis=1)[:, :kk]
            out[f"top{kk}_accuracy"] = float(np.mean([yy in row for yy, row in zip(y, top)]))
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, p, labels=labels, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(pr), float(rc), float(f1)
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, p, labels=labels, average=None, zero_division=0)
    out["per_class"] = {
        name: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f1[i]), "support": int(sup[i])}
        for i, name in enumerate(class_names)
    }
    clipped = np.clip(prob, 1e-15, 1.0)
    out["log_loss"] = float(-np.mean(np.log(clipped[np.arange(len(y)), y]))) if len(y) else 0.0
    out["confusion_matrix"] = skm.confusion_matrix(y, p, labels=labels).tolist()
    out["ece"] = expected_calibration_error(y, prob, bins)
    if k == 2:
        out.update(_binary((y == positive).astype(int), (p == positive).astype(int), prob[:, positive]))
        out["positive_class"] = class_names[positive]
    if bootstrap and len(y):
        out["bootstrap_ci95"] = bootstrap_ci(y, p, k, bootstrap, seed)
    return out


def expected_calibration_error(y, prob, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    if not len(y):
        return 0.0
    conf, pred = prob.max(1), prob.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(np.mean(pred[m] == y[m]) - np.mean(conf[m]))
    return float(ece)


def reliability(y, prob, bins: int = 15):
    """(bin centers, accuracy per bin, confidence per bin, count per bin) for a diagram."""
    conf, pred = prob.max(1), prob.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    acc = np.array([np.mean(pred[idx == b] == y[idx == b]) if np.any(idx == b) else np.nan for b in range(bins)])
    cnf = np.array([np.mean(conf[idx == b]) if np.any(idx == b) else np.nan for b in range(bins)])
    cnt = np.bincount(idx, minlength=bins)
    return (edges[:-1] + edges[1:]) / 2, acc, cnf, cnt


def bootstrap_ci(y, p, k: int, n: int, seed: int = 0) -> dict:
    """Percentile 95% CIs of accuracy and macro F1 over ``n`` resamples of the items."""
    rng = np.random.default_rng(seed)
    accs, f1s = [], []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        accs.append(np.mean(y[i] == p[i]))
        f1s.append(skm.f1_score(y[i], p[i], labels=list(range(k)), average="macro", zero_division=0))
    q = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]  # noqa: E731
    return {"accuracy": q(accs), "macro_f1": q(f1s), "resamples": n}


def _binary(y, p, score) -> dict:
    tp = int(np.sum((y == 1) & (p == 1)))
    tn = int(np.sum((y == 0) & (p == 0)))
    fp = int(np.sum((y == 0) & (p == 1)))
    fn = int(np.sum((y == 1) & (p == 0)))
    out = {
        "sensitivity": tp / (tp + fn) if tp + fn else 0.0,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
    }
    if len(np.unique(y)) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y, score))
        out["pr_auc"] = float(skm.average_precision_score(y, score))
    return out


def classification_report(targets, preds, class_names: list[str]) -> str:
    return skm.classification_report(
        targets, preds, labels=list(range(len(class_names))), target_names=class_names, digits=4, zero_division=0
    )


# ----------------------------------------------------------------------------- per epoch (engine.fit)
LOWER_IS_BETTER = ("val/loss",)  # every other monitor (accuracy, macro F1) is higher-is-better


def improved(monitor: str, value: float, best: Optional[float]) -> bool:
    if best is None:
        return True
    return value < best if monitor in LOWER_IS_BETTER else value > best


def macro_f1(collected: dict) -> dict[str, float]:
    """Macro F1 per task from an epoch's collected targets and predictions (scikit-learn)."""
    return {t: float(skm.f1_score(c["targets"], c["preds"], average="macro", zero_division=0))
            for t, c in collected.items() if "preds" in c}  # (a reconstruction has no classes)


def epoch_ece(collected: dict, bins: int = 15) -> dict[str, float]:
    """Expected calibration error per task from an epoch's collected targets and probabilities
    (the same bins as ``results.json``'s ``ece``)."""
    return {t: expected_calibration_error(np.asarray(c["targets"]), np.asarray(c["probs"], dtype=np.float64), bins)
            for t, c in collected.items() if "probs" in c}


def monitor_value(monitor: str, val) -> float:
    """The monitored validation number (mean over tasks) of an epoch's ``engine.EpochResult``:
    val/loss, val/accuracy, val/macro_f1."""
    if monitor == "val/loss":
        return val.loss
    if monitor == "val/macro_f1":
        return float(np.mean(list(macro_f1(val.collected).values())))
    return float(np.mean(list(val.accuracy.values())))
